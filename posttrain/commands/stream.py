"""``posttrain stream``: run shard sets through the training loader and print its statistics."""

from __future__ import annotations

import argparse
import time

from posttrain.config import CropConfig, StreamConfig

COLUMNS = ("epoch", "batches", "samples", "seconds", "padding", "corrupt", "join", "wall_s", "audio_s/s")


def configure(parser: argparse.ArgumentParser) -> None:
    defaults = StreamConfig()
    parser.add_argument("--shards", nargs="+", required=True, metavar="DIR", help="shard directories (index.json)")
    parser.add_argument("--weights", nargs="+", type=float, default=[],
                        help="per-set repeat factor per epoch (default 1 each)")
    parser.add_argument("--max-batch-seconds", type=float, default=defaults.max_batch_seconds,
                        help="audio seconds per batch, padding included")
    parser.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size, help="samples per batch at most")
    parser.add_argument("--num-buckets", type=int, default=defaults.num_buckets, help="duration buckets")
    parser.add_argument("--num-workers", type=int, default=defaults.num_workers, help="DataLoader worker processes")
    parser.add_argument("--shuffle-buffer", type=int, default=defaults.shuffle_buffer,
                        help="samples in the shuffle buffer")
    parser.add_argument("--crop", choices=["antideepfake", "fixed", "none"], default=CropConfig().policy,
                        help="how long audio is cut")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="shuffle and crop seed")
    parser.add_argument("--epochs", type=int, default=1, help="epochs to stream")


def _row(values: dict) -> list[str]:
    return [str(values["epoch"]), str(values["batches"]), str(values["samples"]), f"{values['seconds']:.1f}",
            f"{100 * values['padding_fraction']:.1f}%", str(values["corrupt"]), str(values["join_batches"]),
            f"{values['wall_s']:.2f}", f"{values['seconds'] / max(values['wall_s'], 1e-9):.0f}"]


def _print_table(rows: list[list[str]]) -> None:
    widths = [max(len(cell) for cell in column) for column in zip(COLUMNS, *rows)]
    for cells in [list(COLUMNS), *rows]:
        print("  ".join(cell.rjust(width) for cell, width in zip(cells, widths)))


def run(args: argparse.Namespace) -> int:
    from posttrain.data.shards import load_index

    for directory in args.shards:  # a missing or unindexed set is one line before the loader (and torch) loads
        load_index(directory)
    from posttrain.data.stream import ShardStream

    cfg = StreamConfig(shards=list(args.shards), weights=list(args.weights),
                       max_batch_seconds=args.max_batch_seconds, max_batch_size=args.max_batch_size,
                       num_buckets=args.num_buckets, num_workers=args.num_workers,
                       shuffle_buffer=args.shuffle_buffer, seed=args.seed, crop=CropConfig(policy=args.crop))
    stream = ShardStream(cfg)
    rows, previous = [], stream.stats()
    for epoch in range(args.epochs):
        stream.set_epoch(epoch)
        start = time.perf_counter()
        for _ in stream:
            pass
        totals = stream.stats()
        epoch_stats = {key: totals[key] - previous[key]  # per epoch, from the running totals
                       for key in ("batches", "samples", "seconds", "padded_seconds", "corrupt", "join_batches")}
        padded = epoch_stats["padded_seconds"]
        epoch_stats.update(epoch=epoch, padding_fraction=1 - epoch_stats["seconds"] / padded if padded else 0.0,
                           wall_s=time.perf_counter() - start)
        rows.append(_row(epoch_stats))
        previous = totals
    _print_table(rows)
    totals = stream.stats()
    print(f"\n{len(cfg.shards)} shard set(s), {stream.epoch_samples()} samples in the last epoch; "
          f"padding over all epochs {100 * totals['padding_fraction']:.1f}%; "
          f"corrupt by reason {totals['corrupt_by_reason'] or 'none'}")
    return 0
