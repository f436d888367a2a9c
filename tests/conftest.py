import logging

import pytest
import torch

# helpers.py holds shared assertions (assert_bitwise_equal, repeatable_epoch_batches): detailed failures there too
pytest.register_assert_rewrite("helpers")

MICRO = dict(img_size=32, patch_size=2, embed_dim=24, depths=(2, 2), num_heads=(2, 4), window_size=4)


# One intra-op thread: tests also start data workers and torchrun groups on a 2-core machine, where
# oversubscribed OpenMP threads make micro-model steps 10x slower.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _log_records_reach_caplog():
    """A CLI run in this process (setup_logging) stops the package logger's propagation, which caplog needs,
    and leaves it a stdout handler, which would write into a later test's captured stdout (a --json report)."""
    logger = logging.getLogger("swin_train")
    logger.propagate = True
    handlers = list(logger.handlers)
    yield
    for handler in [h for h in logger.handlers if h not in handlers]:
        logger.removeHandler(handler)
    logger.propagate = True


@pytest.fixture
def micro_arch():
    """A micro Swin: 16x16 tokens, two stages, windows of 4 (stage 1 at 8x8 still shifts)."""
    return dict(MICRO)


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory):
    """A small shapes set (8 classes, 32 px): 128 train / 16 val images per class."""
    from swin_train.data.shapes import ensure_shapes_dataset

    return ensure_shapes_dataset(
        tmp_path_factory.mktemp("data") / "shapes", img_size=32, train_per_class=128, val_per_class=16
    )
