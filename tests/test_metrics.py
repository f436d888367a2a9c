"""The log lines of swin_train/metrics.py."""

from swin_train.metrics import epoch_line, reconstruction_epoch_line


def test_epoch_lines_of_both_tasks_share_the_training_part_and_the_skipped_steps():
    train = dict(epoch=2, train_loss=0.5, train_lr=1e-3, train_img_s=123.45, train_epoch_time=6.78)
    skipped = dict(train_nonfinite_steps=3)
    record = dict(train, **skipped, val_topk=5, val_top1=0.5, val_top5=0.9, val_loss=1.25, best_top1=0.6)
    record |= dict(ema_top1=0.55, ema_top5=0.95)
    assert epoch_line(record, 10) == (
        "epoch 3/10: loss 0.5000, lr 1.00e-03, 123.5 img/s, 6.8s | val top-1 50.00%, top-5 90.00%, loss 1.2500"
        " | ema top-1 55.00%, top-5 95.00% | 3 non-finite steps skipped | best 60.00%"
    )
    record = dict(train, train_nonfinite_steps=0, val_loss=0.75, ema_loss=0.7, best_loss=0.7)
    assert reconstruction_epoch_line(record, 10) == (
        "epoch 3/10: loss 0.5000, lr 1.00e-03, 123.5 img/s, 6.8s | val masked loss 0.7500"
        " | ema masked loss 0.7000 | best 0.7000"
    )
