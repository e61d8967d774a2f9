"""The complete solver's settings, with their defaults and meaning in one place.

Every field's ``help`` is what ``certkit config show`` and the command line print; the
defaults are the settings of every published VNN-COMP figure (docs/benchmarks.md). Files and
``--set`` overrides are read by :mod:`certkit.settings`.
"""

from __future__ import annotations

from dataclasses import dataclass

from certkit.settings import setting


def _setting(default, help: str, minimum: float = 0):
    return setting(default, help, min=minimum)


@dataclass
class SolverConfig:
    attack_restarts: int = _setting(16, "PGD: random starting points per round of the first attack", 1)
    attack_steps: int = _setting(60, "PGD: steps per round")
    attack_time: float = _setting(0.03, "share of the time limit the first attack may use, beyond one round...")
    attack_time_max: float = _setting(5.0, "...and at most this many seconds")
    input_split_max: int = _setting(20, "networks with at most this many inputs get input splitting, "
                                        "the others ReLU splitting")
    split_candidates: int = _setting(1, "input splitting: dimensions tried per split", 1)
    split_min_width: float = _setting(0.02, "input splitting: only dimensions this wide relative to the widest "
                                            "are split")
    reuse_parent_bounds: bool = _setting(True, "input splitting: children try their parent's intervals first")
    box_attack_every: int = _setting(10, "input splitting: PGD inside the worst-bounded open boxes every this "
                                         "many batches...", 1)
    box_attack_steps: int = _setting(20, "...for this many steps")
    alpha_iterations: int = _setting(30, "α-CROWN steps for the property on the whole box")
    intermediate_alpha_iterations: int = _setting(20, "ReLU splitting: α-CROWN steps per intermediate bound at "
                                                      "the root...")
    intermediate_alpha_time: float = _setting(0.2, "...within this share of the time left (later layers get CROWN)")
    float32_steps: bool = _setting(True, "ReLU splitting: α-β steps in float32, kept α and β checked in float64")
    bab_iterations: int = _setting(10, "ReLU splitting: α-β-CROWN steps per batch of children")
    milp_after: float = _setting(0.1, "ReLU splitting: a first try within this share of the time left; if it "
                                      "fails...")
    milp_time: float = _setting(0.25, "...MILP-refined intermediate bounds within this share of the time left "
                                      "before it (0: never)...")
    milp_max_neurons: int = _setting(2048, "...for networks with at most this many ReLU neurons...")
    milp_seconds_per_bound: float = _setting(1.0, "...each bound with at most this much solver time...")
    milp_workers: int = _setting(2, "...this many programs at a time...", 1)
    milp_branch: float = _setting(0.5, "...after the second layer's branch and bound in this share of that time...")
    milp_priority: bool = _setting(True, "...its neurons whose relaxation costs the property's bound most first")
    seed: int = _setting(0, "seed of the attacks' random starting points")
