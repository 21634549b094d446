"""Training curves: loss and accuracy per epoch, as one PNG."""
from pathlib import Path
from typing import Any, Dict, List

from matplotlib.figure import Figure

__all__ = ['plot_curves']


def plot_curves(history: List[Dict[str, Any]], path: Path) -> None:
    """Left: train and val loss; right: val top-1 and top-5 (%)."""
    epochs = [row['epoch'] for row in history]
    fig = Figure(figsize=(10, 4))
    ax_loss, ax_acc = fig.subplots(1, 2)
    ax_loss.plot(epochs, [row['train_loss'] for row in history], marker='o', label='train')
    ax_loss.plot(epochs, [row['val_loss'] for row in history], marker='o', label='val')
    ax_loss.set(xlabel='epoch', ylabel='loss', title='loss')
    ax_acc.plot(epochs, [row['top1'] for row in history], marker='o', label='top-1')
    ax_acc.plot(epochs, [row['top5'] for row in history], marker='o', label='top-5')
    ax_acc.set(xlabel='epoch', ylabel='accuracy (%)', title='validation accuracy')
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
