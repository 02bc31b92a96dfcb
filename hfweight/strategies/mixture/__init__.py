"""Domain-mixture controllers (``mixture=...``), one module per method; importing this package registers them all.

- ``static``, ``temperature`` (``α_d ∝ n_d^{1/τ}``), ``schedule`` (staged over training): :mod:`.static`.
- ``doremi`` (Xie et al. 2023, excess loss over a reference): :mod:`.doremi`.
- ``odm`` (Albalak et al. 2023, EXP3 on the training loss): :mod:`.odm`.
- ``aioli`` (Chen et al. 2024, the mixing law estimated from probe runs): :mod:`.aioli`.
- ``skillit`` (Chen et al. 2023, skills graph × held-out losses): :mod:`.skillit`.
- ``dga`` (Fan et al. 2024, gradient alignment with a target set): :mod:`.dga`.
- ``policy`` (a user callable ``(history) -> weights``): :mod:`.policy`.
- ``learning_progress`` (Graves et al. 2017, Exp3.S on the loss decrease): :mod:`.learning_progress`.

:mod:`.base` holds what they share: the update ``log α ← log α + η·A·signal`` (:func:`mix_update`), the floor
(:func:`floor_probabilities`), the parsing of user weights, and the common base class (binding, state), with the
protocol the glue implements.
"""

from .aioli import AioliMixture, probe_mixture
from .base import floor_probabilities, load_weights_file, mix_update, normalize_domain_weights
from .dga import DGAMixture, alignment_signal
from .doremi import DoReMiMixture
from .learning_progress import LearningProgressMixture, exp3s_weights, rescale_progress
from .odm import ODMMixture
from .policy import PolicyMixture
from .skillit import SkillItMixture
from .static import ScheduleMixture, StaticMixture, TemperatureMixture

__all__ = [
    "AioliMixture",
    "DGAMixture",
    "DoReMiMixture",
    "LearningProgressMixture",
    "ODMMixture",
    "PolicyMixture",
    "ScheduleMixture",
    "SkillItMixture",
    "StaticMixture",
    "TemperatureMixture",
    "alignment_signal",
    "exp3s_weights",
    "floor_probabilities",
    "load_weights_file",
    "mix_update",
    "normalize_domain_weights",
    "probe_mixture",
    "rescale_progress",
]
