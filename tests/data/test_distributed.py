"""build_loaders(distributed=True) under a real 2-process gloo group: the ranks split train and validation
disjointly, and each has the whole test split (one process evaluates and counts it, as verify does)."""
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from data import build_loaders

from .conftest import CIFAR_CLASSES, loader_kwargs


def _rank_main(rank: int, init_file: str, cifar_root: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # a forked child must not enter the parent's OpenMP pool (it would hang)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        for resident in (False, True):
            loaders = build_loaders("cifar100", **loader_kwargs(root=cifar_root, batch_size=25, distributed=True,
                                                                val_split=CIFAR_CLASSES, gpu_resident=resident,
                                                                device=torch.device("cpu")))
            loaders.train.set_epoch(0)
            torch.save({split: torch.cat([x for x, _ in loader]) for split, loader in loaders._asdict().items()}
                       | {"lengths": tuple(map(len, loaders)),
                          "world_sizes": tuple(loader.world_size for loader in loaders)},
                       f"{out_dir}/rank{rank}{'_resident' * resident}.pt")
    finally:
        dist.destroy_process_group()


def rows(images: torch.Tensor) -> list[bytes]:
    return [image.numpy().tobytes() for image in images]


def test_two_ranks_split_train_and_validation_and_each_has_the_whole_test_split(cifar_root, tmp_path):
    # fork: the children reuse the imported modules instead of re-importing torch (seconds per process).
    mp.start_processes(_rank_main, args=(str(tmp_path / "init"), cifar_root, str(tmp_path)), nprocs=2,
                       start_method="fork")
    for resident in ("", "_resident"):  # the CPU path, then the GPU-resident loaders (here on the CPU)
        _check_ranks([torch.load(tmp_path / f"rank{r}{resident}.pt") for r in (0, 1)], cifar_root)


def _check_ranks(ranks: list[dict], cifar_root: str) -> None:
    alone = build_loaders("cifar100", **loader_kwargs(root=cifar_root, val_split=CIFAR_CLASSES))
    # 200 training images, 100 held out (one per class): 100 train / 2 ranks / 25 = 2 batches; validation
    # 100 / 2 ranks / 32 = 2 batches (50 each, the last partial); test 100 whole / 32 = 4 batches on each rank.
    assert [r["lengths"] for r in ranks] == [(2, 2, 4), (2, 2, 4)]
    assert [r["world_sizes"] for r in ranks] == [(2, 2, 1), (2, 2, 1)]
    everything = {split: rows(torch.cat([x for x, _ in getattr(alone, split)])) for split in ("val", "test")}
    assert sorted(rows(ranks[0]["val"]) + rows(ranks[1]["val"])) == sorted(everything["val"])
    assert rows(ranks[0]["test"]) == rows(ranks[1]["test"]) == everything["test"]  # whole, in dataset order
    train_rows = [set(rows(r["train"])) for r in ranks]
    assert len(train_rows[0]) == len(train_rows[1]) == 50 and not train_rows[0] & train_rows[1]
