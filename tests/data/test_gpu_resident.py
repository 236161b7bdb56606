"""The GPU-resident loader, run on CPU tensors: same augmentation distribution as the per-image CPU path,
seeded epochs, exact evaluation, rank splits."""
import numpy as np
import pytest
import torch
from scipy.stats import chi2_contingency, chisquare

from data import build_loaders, gpu_resident_by_default, gpu_resident_supported
from data.augment import AugmentOptions, cutout_
from data.datasets import ArrayImageDataset
from data.gpu_loader import GpuResidentLoader
from data.sampling import AugmentedDataset, EpochSampler
from data.transforms import train_transform

from .conftest import loader_kwargs

CPU = torch.device("cpu")
IDENTITY = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # outputs stay in [0, 1]: pixel values decode exactly
DRAWS, PADDING = 3000, 4


def coded_images(n: int) -> ArrayImageDataset:
    """n copies of a 32×32 image whose red = 8 × row, green = 8 × column, blue = 255 (padding has blue 0)."""
    grid = np.arange(32, dtype=np.uint8) * 8
    image = np.stack([np.repeat(grid[:, None], 32, 1), np.repeat(grid[None, :], 32, 0), np.full((32, 32), 255)], -1)
    return ArrayImageDataset(np.repeat(image[None].astype(np.uint8), n, 0), np.zeros(n, dtype=np.int64))


def cpu_path(dataset: ArrayImageDataset, augment: dict, epoch: int = 0) -> torch.Tensor:
    """The per-image pipeline the CPU DataLoader runs (torchvision RandomCrop + flip, Cutout), keyed by EpochSampler."""
    transform = train_transform(AugmentOptions.from_mapping(augment), 32, resize_crop=False, **IDENTITY)
    images = AugmentedDataset(dataset, transform, stochastic=True)
    sampler = EpochSampler(images, seed=0)
    sampler.set_epoch(epoch)
    return torch.stack([images[key][0] for key in sampler])


def gpu_path(dataset: ArrayImageDataset, augment: dict, epoch: int = 0) -> torch.Tensor:
    loader = GpuResidentLoader(dataset, batch_size=500, device=CPU, options=AugmentOptions.from_mapping(augment),
                               seed=0, **IDENTITY)
    loader.set_epoch(epoch)
    return torch.cat([x for x, _ in loader])


def crop_and_flip_draws(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Recover each image's crop offsets (dy, dx in 0..2·PADDING) and flip from the coded centre pixels."""
    pixels = torch.round(images * 255).long()
    row, col, next_col = pixels[:, 0, 16, 16] // 8, pixels[:, 1, 16, 16] // 8, pixels[:, 1, 16, 17] // 8
    flipped = next_col < col
    dx = torch.where(flipped, col - 15, col - 16) + PADDING
    return row - 16 + PADDING, dx, flipped


def histogram(values: torch.Tensor) -> np.ndarray:
    return np.bincount(values.numpy(), minlength=2 * PADDING + 1)


def test_crop_offsets_and_flips_match_the_cpu_path():
    augment = {"crop_padding": PADDING, "hflip": True}
    cpu = crop_and_flip_draws(cpu_path(coded_images(DRAWS), augment))
    gpu = crop_and_flip_draws(gpu_path(coded_images(DRAWS), augment))
    for dy, dx, flipped in (cpu, gpu):
        for offsets in (dy, dx):
            assert offsets.min() >= 0 and offsets.max() <= 2 * PADDING
            assert chisquare(histogram(offsets)).pvalue > 1e-3  # uniform over 0..2·PADDING
        assert abs(flipped.float().mean().item() - 0.5) < 4 * (0.25 / DRAWS) ** 0.5
        assert abs(torch.corrcoef(torch.stack([dy, dx]).float())[0, 1].item()) < 4 / DRAWS ** 0.5  # independent
    for cpu_values, gpu_values in zip(cpu[:2], gpu[:2]):
        assert chi2_contingency([histogram(cpu_values), histogram(gpu_values)]).pvalue > 1e-3
    assert abs(cpu[2].float().mean() - gpu[2].float().mean()).item() < 4 * (0.5 / DRAWS) ** 0.5
    # The same test has the power to see a one-pixel error in the offset range.
    one_short = torch.randint(2 * PADDING, (DRAWS,), generator=torch.Generator().manual_seed(0))
    assert chisquare(histogram(one_short)).pvalue < 1e-6


def expected_cutout_frequency(size: int, extent: int = 32) -> np.ndarray:
    """P(pixel is cut) for a centre uniform over the image: enumerate every centre row × column."""
    cover = np.zeros((extent, extent))
    for centre in range(extent):
        cover[centre, max(0, centre - size // 2):max(0, centre - size // 2 + size)] = 1
    per_axis = cover.mean(axis=0)
    return np.outer(per_axis, per_axis)


@pytest.mark.parametrize("path", [cpu_path, gpu_path])
def test_cutout_matches_its_definition(path):
    images = path(coded_images(DRAWS), {"cutout": 8})
    cut = (images[:, 2] == 0).double().mean(dim=0).numpy()  # blue is 1 everywhere except where cut
    expected = expected_cutout_frequency(8)
    assert np.abs(cut - expected).max() < 5 * np.sqrt(expected.max() * (1 - expected.max()) / DRAWS)
    assert cut.sum() == pytest.approx(expected.sum(), rel=0.03)  # mean area: 64 inside, less at the borders


def test_cutout_op_clips_at_the_border():
    image = torch.ones(1, 1, 6, 6)
    generator = torch.Generator().manual_seed(0)
    areas = {int((cutout_(image.clone(), 4, generator) == 0).sum()) for _ in range(400)}
    assert areas == {4, 6, 8, 9, 12, 16}  # rows/columns covered: 2, 3 or 4 each


def pixel_statistics(loader, epochs: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    images = torch.cat([x for epoch in range(epochs) for x, _ in (loader.set_epoch(epoch), loader)[1]])
    return images.mean(0), images.var(0), len(images)


def max_z(a, b) -> float:
    (mean_a, var_a, n_a), (mean_b, var_b, n_b) = a, b
    return ((mean_a - mean_b).abs() / (var_a / n_a + var_b / n_b + 1e-12).sqrt()).max().item()


@pytest.mark.slow
def test_augmented_batches_have_the_same_pixel_statistics(cifar_root):
    def statistics(gpu_resident: bool, padding: int):
        augment = {"crop_padding": padding, "hflip": True, "cutout": 8}
        train, _, _ = build_loaders("cifar100", **loader_kwargs(root=cifar_root, batch_size=50, augment=augment,
                                                             gpu_resident=gpu_resident, device=CPU))
        return pixel_statistics(train, epochs=10)

    cpu = statistics(False, 4)
    assert max_z(cpu, statistics(True, 4)) < 5
    assert max_z(cpu, statistics(True, 2)) > 8  # and would notice a wrong padding


def test_eval_batches_equal_the_cpu_path(cifar_root):
    for dataset, root in (("digits", None), ("cifar100", cifar_root)):
        batches = [list(build_loaders(dataset, **loader_kwargs(root=root, gpu_resident=gpu_resident, device=CPU)).test)
                   for gpu_resident in (False, True)]
        inputs, targets = ([torch.cat([batch[i] for batch in path]) for path in batches] for i in (0, 1))
        assert torch.allclose(*inputs, atol=1e-6) and torch.equal(*targets)  # the same examples, in the same order


def test_epochs_are_seeded(cifar_root):
    def epoch(loader, n):
        loader.set_epoch(n)
        return torch.cat([x for x, _ in loader]), torch.cat([y for _, y in loader])

    kwargs = loader_kwargs(root=cifar_root, batch_size=50, augment={"crop_padding": 4, "hflip": True, "cutout": 8},
                           gpu_resident=True, device=CPU)
    train, _, _ = build_loaders("cifar100", **kwargs)
    assert len(train) == 4 and train.dataset_size == 200
    first, second = epoch(train, 0), epoch(train, 1)
    resumed, _, _ = build_loaders("cifar100", **kwargs)
    again = epoch(resumed, 1)
    assert torch.equal(second[0], again[0]) and torch.equal(second[1], again[1])
    assert not torch.equal(first[1], second[1])
    assert first[0].dtype == torch.float32 and first[0].shape == (200, 3, 32, 32)


def index_images(n: int) -> ArrayImageDataset:
    """Images whose pixels spell their own index (red = index // 256, green = index % 256)."""
    index = np.arange(n)
    images = np.zeros((n, 4, 4, 3), dtype=np.uint8)
    images[..., 0], images[..., 1] = (index // 256)[:, None, None], (index % 256)[:, None, None]
    return ArrayImageDataset(images, index % 10)


def loaded_indices(loader) -> list[int]:
    pixels = torch.cat([torch.round(x[:, :2, 0, 0] * 255).long() for x, _ in loader])
    return (pixels[:, 0] * 256 + pixels[:, 1]).tolist()


def test_rank_splits():
    dataset = index_images(1001)
    common = dict(device=CPU, seed=0, world_size=2, **IDENTITY)
    train = [GpuResidentLoader(dataset, batch_size=100, options=AugmentOptions(), rank=r, **common) for r in (0, 1)]
    seen = [loaded_indices(loader) for loader in train]
    assert len(seen[0]) == len(seen[1]) == 500 and len(train[0]) == 5  # equal batches per rank, drop_last
    assert not set(seen[0]) & set(seen[1]) and len(set(seen[0] + seen[1])) == 1000
    test = [GpuResidentLoader(dataset, batch_size=100, options=None, rank=r, **common) for r in (0, 1)]
    assert [len(loader) for loader in test] == [6, 5]
    assert sorted(loaded_indices(test[0]) + loaded_indices(test[1])) == list(range(1001))


def test_each_rank_draws_its_own_crops_and_flips():
    """Identical images: what differs between the ranks' batches is only the augmentation drawn for them."""
    augment = AugmentOptions.from_mapping({"crop_padding": PADDING, "hflip": True})
    draws = []
    for rank in (0, 1):
        loader = GpuResidentLoader(coded_images(2 * DRAWS), batch_size=DRAWS, device=CPU, options=augment, seed=0,
                                   rank=rank, world_size=2, **IDENTITY)
        draws.append(torch.stack(crop_and_flip_draws(next(iter(loader))[0])))
    same_draws = (draws[0] == draws[1]).all(dim=0).float().mean().item()
    # Independent draws agree on (dy, dx, flip) with probability 1/(9·9·2): ~37 of 3000; one shared stream, always.
    assert same_draws < 0.03


def test_unsupported_options_are_refused(cifar_root):
    message = "does not support augment auto_augment; turn it off or set data.gpu_resident=false"
    with pytest.raises(ValueError, match=message):
        build_loaders("cifar100", **loader_kwargs(root=cifar_root, augment={"auto_augment": "autoaugment"},
                                                  gpu_resident=True, device=CPU))


def test_gpu_resident_supported_where_the_device_can_apply_the_augmentation():
    assert gpu_resident_supported("cifar100", {"crop_padding": 4, "hflip": True, "cutout": 8, "mixup": 0.2})
    assert gpu_resident_supported("digits", {})
    assert not gpu_resident_supported("cifar100", {"auto_augment": "rand-m9-mstd0.5"})
    assert not gpu_resident_supported("imagenet", {})


def test_auto_keeps_cifar100_on_a_cuda_device_where_it_can_be_augmented_there():
    assert gpu_resident_by_default("cifar100", {"crop_padding": 4, "hflip": True, "cutout": 8}, cuda=True)
    assert not gpu_resident_by_default("cifar100", {"crop_padding": 4, "hflip": True, "cutout": 8}, cuda=False)
    assert not gpu_resident_by_default("cifar100", {"auto_augment": "rand-m9-mstd0.5"}, cuda=True)
    assert not gpu_resident_by_default("digits", {}, cuda=True)
    assert not gpu_resident_by_default("wikitext103", None, cuda=True)
