"""Poisoning attacks as jitted, differentiable JAX programs, and the `PoisonSet` they return.

One module per attack; every attack returns a `PoisonSet` that `merge` adds
to a clean training set (with an `is_poison` mask) and `save` / `load` keep
as `.npz`:

- `label_flip` (flipping.py): random label flipping (Hong et al. §6.2).
- `watermark` (collision.py): watermark feature collision (§3.1).
- `patch_backdoor` (patch.py): BadNets white-square backdoor (§3.1, §3.3).
- `blend` (blending.py): Chen et al.'s blended backdoor.
- `steinhardt` (sphere_slab.py): Steinhardt, Koh & Liang's min-max attack
  on sphere and slab defenses (§6.2, §7.1); `feasibility` checks poisons.
- `poison_frogs` (frogs.py): Shafahi et al.'s clean-label feature collision
  (§6.3, §6.4).
- `witches_brew` (gradient_matching.py): Geiping et al.'s gradient matching.
- `narcissus` (narcissus.py): Zeng et al.'s clean-label Narcissus backdoor.

References:
  Hong et al. 2020, "On the Effectiveness of Mitigating Data Poisoning Attacks
  with Gradient Shaping", §2.1.1, §3.1, §6.2-§6.4, §7.1.
"""

from jaxshape.poisons.blending import apply_blend
from jaxshape.poisons.blending import blend
from jaxshape.poisons.blending import blend_trigger
from jaxshape.poisons.collision import collision_pairs
from jaxshape.poisons.collision import watermark
from jaxshape.poisons.flipping import label_flip
from jaxshape.poisons.frogs import Collision
from jaxshape.poisons.frogs import collide
from jaxshape.poisons.frogs import nearest_candidates
from jaxshape.poisons.frogs import poison_frogs
from jaxshape.poisons.gradient_matching import Brew
from jaxshape.poisons.gradient_matching import Recipe
from jaxshape.poisons.gradient_matching import alignment_loss
from jaxshape.poisons.gradient_matching import augment_images
from jaxshape.poisons.gradient_matching import brew
from jaxshape.poisons.gradient_matching import target_gradient
from jaxshape.poisons.gradient_matching import witches_brew
from jaxshape.poisons.narcissus import apply_narcissus
from jaxshape.poisons.narcissus import narcissus
from jaxshape.poisons.narcissus import optimise_trigger
from jaxshape.poisons.narcissus import surrogate_set
from jaxshape.poisons.narcissus import warm_up_surrogate
from jaxshape.poisons.patch import patch_backdoor
from jaxshape.poisons.patch import patch_trigger
from jaxshape.poisons.poison_set import PoisonSet
from jaxshape.poisons.poison_set import Trigger
from jaxshape.poisons.poison_set import apply_trigger
from jaxshape.poisons.poison_set import backdoor_test_set
from jaxshape.poisons.poison_set import load
from jaxshape.poisons.poison_set import merge
from jaxshape.poisons.poison_set import save
from jaxshape.poisons.sphere_slab import Feasibility
from jaxshape.poisons.sphere_slab import SphereSlabDefense
from jaxshape.poisons.sphere_slab import feasibility
from jaxshape.poisons.sphere_slab import fit_defense
from jaxshape.poisons.sphere_slab import steinhardt

__all__ = [
  "Brew",
  "Collision",
  "Feasibility",
  "PoisonSet",
  "Recipe",
  "SphereSlabDefense",
  "Trigger",
  "alignment_loss",
  "apply_blend",
  "apply_narcissus",
  "apply_trigger",
  "augment_images",
  "backdoor_test_set",
  "blend",
  "blend_trigger",
  "brew",
  "collision_pairs",
  "feasibility",
  "collide",
  "fit_defense",
  "label_flip",
  "load",
  "merge",
  "narcissus",
  "nearest_candidates",
  "optimise_trigger",
  "patch_backdoor",
  "patch_trigger",
  "poison_frogs",
  "save",
  "steinhardt",
  "surrogate_set",
  "target_gradient",
  "warm_up_surrogate",
  "watermark",
  "witches_brew",
]
