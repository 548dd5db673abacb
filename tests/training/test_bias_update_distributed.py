"""Expert counts are summed over data-parallel ranks before the bias update (2 gloo processes)."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from deepseek_model.config import ModelConfig, builtin_config_dict
from deepseek_model.moe import Gate
from deepseek_model.training import BiasUpdater

WORLD = 2
LOADS = ([9, 0, 1, 2, 0, 0, 0, 0], [0, 1, 2, 5, 6, 7, 0, 1])  # per-rank counts; summed: [9, 1, 3, 7, 6, 7, 0, 1]


class _Holder(torch.nn.Module):
    def __init__(self, gate):
        super().__init__()
        self.gate = gate


def _worker(rank, store_path, out_path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=WORLD)
    try:
        d = builtin_config_dict("tiny")
        d.update({"n_routed_experts": 8, "n_group": 4, "topk_group": 2, "num_experts_per_tok": 2})
        gate = Gate(ModelConfig.from_dict(d), torch.float32, "cpu")
        updater = BiasUpdater(_Holder(gate), gamma=0.5, group=dist.group.WORLD)
        updater.counts["gate"].copy_(torch.tensor(LOADS[rank]))
        stats = updater.step()
        torch.save({"bias": gate.bias.clone(), "counts": stats["gate"].counts}, f"{out_path}.{rank}")
    finally:
        dist.destroy_process_group()


def test_counts_are_all_reduced_over_ranks(tmp_path):
    out = str(tmp_path / "result")
    mp.start_processes(_worker, args=(str(tmp_path / "store"), out), nprocs=WORLD, start_method="spawn")
    total = torch.tensor(LOADS[0]) + torch.tensor(LOADS[1])  # mean 4.25
    want = 0.5 * torch.sign(total.double().mean() - total.double()).float()
    for rank in range(WORLD):
        got = torch.load(f"{out}.{rank}", weights_only=True)
        assert got["counts"].tolist() == total.tolist()
        torch.testing.assert_close(got["bias"], want, rtol=0, atol=0)  # every rank applies the same update
