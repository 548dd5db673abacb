"""Expert counts are summed over data-parallel ranks before the bias update (2 gloo processes)."""

import torch
from multiprocess_harness import results, run_workers

from deepseek_model.config import ModelConfig, builtin_config_dict
from deepseek_model.moe import Gate
from deepseek_model.training import BiasUpdater

WORLD = 2
LOADS = ([9, 0, 1, 2, 0, 0, 0, 0], [0, 1, 2, 5, 6, 7, 0, 1])  # per-rank counts; summed: [9, 1, 3, 7, 6, 7, 0, 1]


class _Holder(torch.nn.Module):
    def __init__(self, gate):
        super().__init__()
        self.gate = gate


def bias_update_worker(ctx, loads):
    """One data-parallel rank: its own counts, the all-reduced update."""
    import torch.distributed as dist

    d = builtin_config_dict("tiny")
    d.update({"n_routed_experts": 8, "n_group": 4, "topk_group": 2, "num_experts_per_tok": 2})
    gate = Gate(ModelConfig.from_dict(d), torch.float32, "cpu")
    updater = BiasUpdater(_Holder(gate), gamma=0.5, group=dist.group.WORLD)
    updater.counts["gate"].copy_(torch.tensor(loads[ctx.rank]))
    stats = updater.step()
    return {"bias": gate.bias.clone(), "counts": stats["gate"].counts}


def test_counts_are_all_reduced_over_ranks():
    ranks = results(run_workers(bias_update_worker, WORLD, LOADS))
    total = torch.tensor(LOADS[0]) + torch.tensor(LOADS[1])  # mean 4.25
    want = 0.5 * torch.sign(total.double().mean() - total.double()).float()
    for got in ranks:
        assert got["counts"].tolist() == total.tolist()
        torch.testing.assert_close(got["bias"], want, rtol=0, atol=0)  # every rank applies the same update
