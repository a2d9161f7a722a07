"""Pure aggregation mathematics for rank-heterogeneous federated LoRA (CPU torch, no I/O).

Effective update of a device: dW_k = s_k B_k A_k with A (r, in), B (out, r); aggregation
weights p_k = w_k / sum w. Strategies: `fedavg` (FedIT), `zero_pad` (HetLoRA), `stack`
(FLoRA), `svd_redistribute` (FlexLoRA), `fedsa` (FedSA-LoRA), ZO replay (`zo`), plus
robust (`robust`), differentially private (`dp`) and streaming (`streaming`) variants and
the adapter-state-dict level (`state`). Which method combines them how: `coordinator.methods`.
"""
from .dp import DPConfig, DPResult, RDPAccountant, dp_aggregate, epsilon_per_round
from .fedavg import fedavg
from .fedsa import fedsa
from .robust import clip_updates, coordinate_median, effective_norm, trimmed_mean
from .stack import stack
from .state import DeviceState, GlobalState, aggregate_modules, fresh_adapter, module_updates, split_state
from .streaming import PairedAggregator, StreamingAggregator
from .svd import factor_svd, svd_redistribute
from .types import LoraUpdate, effective, lora_scale, pad, rescale_balanced, to_scale, truncate
from .validation import validate_updates
from .zero_pad import zero_pad
from .zo import weighted_state_average, zo_aggregate, zo_replay_update

__all__ = [
    "LoraUpdate", "fedavg", "zero_pad", "stack", "svd_redistribute", "fedsa",
    "to_scale", "truncate", "pad", "effective", "lora_scale", "rescale_balanced", "factor_svd", "validate_updates",
    "zo_replay_update", "zo_aggregate", "weighted_state_average",
    "split_state", "module_updates", "aggregate_modules", "fresh_adapter", "DeviceState", "GlobalState",
    "effective_norm", "clip_updates", "trimmed_mean", "coordinate_median",
    "DPConfig", "DPResult", "RDPAccountant", "dp_aggregate", "epsilon_per_round",
    "StreamingAggregator", "PairedAggregator",
]
