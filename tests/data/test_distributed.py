"""build_loaders(distributed=True) under a real 2-process gloo group: ranks split train and test disjointly."""
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from data import build_loaders

from .conftest import loader_kwargs


def _rank_main(rank: int, init_file: str, cifar_root: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # a forked child must not enter the parent's OpenMP pool (it would hang)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        train, _, test = build_loaders("cifar100", **loader_kwargs(root=cifar_root, batch_size=25, distributed=True))
        train.set_epoch(0)
        torch.save({"train": torch.cat([x for x, _ in train]), "test": torch.cat([x for x, _ in test]),
                    "lengths": (len(train), len(test))}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def rows(images: torch.Tensor) -> list[bytes]:
    return [image.numpy().tobytes() for image in images]


def test_two_ranks_split_the_data(cifar_root, tmp_path):
    # fork: the children reuse the imported modules instead of re-importing torch (seconds per process).
    mp.start_processes(_rank_main, args=(str(tmp_path / "init"), cifar_root, str(tmp_path)), nprocs=2,
                       start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    _, _, test = build_loaders("cifar100", **loader_kwargs(root=cifar_root))
    everything = rows(torch.cat([x for x, _ in test]))
    assert [r["lengths"] for r in ranks] == [(4, 2), (4, 2)]  # 200 train / 2 ranks / 25; 100 test / 2 / 32
    assert sorted(rows(ranks[0]["test"]) + rows(ranks[1]["test"])) == sorted(everything)
    train_rows = [set(rows(r["train"])) for r in ranks]
    assert len(train_rows[0]) == len(train_rows[1]) == 100 and not train_rows[0] & train_rows[1]
