"""Pure routing decisions (no I/O): ``policy`` (per-path routing policy), ``decision``
(per-request route), ``confidence`` (scores from token log-probs), ``comparators`` (agreement
of two answers), ``stats`` (Wilson bounds), ``calibration`` (threshold from
shadow evidence), ``ramp`` (share controller). Imports neither ``gateway`` nor ``distill``."""
