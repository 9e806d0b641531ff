"""What the suites share: the run context (device, mode, calibration, notes) and aligned tables."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch


@dataclass
class RunContext:
    device: torch.device
    quick: bool                       # --quick (the default): small sweeps, few repeats
    dtype: torch.dtype                # kernels suite input dtype
    kernels: list[str]                # implementations to time: "torch" and/or "triton" (resolved --kernels)
    sizes: list[int] | None = None    # --sizes override for the kernels suite
    presets: list[str] | None = None  # --preset override for train / decode
    compile: bool = True              # include torch.compile providers / modes
    batch_size: int | None = None     # train suite override
    seq_len: int | None = None        # train suite override
    new_tokens: int | None = None     # decode suite override
    contexts: list[int] | None = None # decode suite context-length sweep override
    calibration: dict = field(default_factory=dict)  # copy bandwidth, matmul peak (measured)
    notes: list[str] = field(default_factory=list)

    def note(self, msg: str) -> None:
        """Something the reader must know (a skipped provider, a missing module): printed and saved."""
        self.notes.append(msg)
        progress(f"note: {msg}")


def log(msg: str) -> None:
    print(msg, flush=True)


def progress(msg: str) -> None:
    """Per-measurement progress on stderr, so stdout stays tables + the final JSON line."""
    print(msg, file=sys.stderr, flush=True)


def fmt(value, digits: int = 3) -> str:
    """A number in a table cell: 3 significant digits, thousands separators for large values."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != value:
            return "nan"
        if abs(value) >= 10 ** digits:
            return f"{value:,.0f}"
        if value == 0:
            return "0"
        return f"{value:.{digits}g}" if abs(value) >= 1e-3 else f"{value:.2e}"
    return str(value)


def format_table(title: str, rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """An aligned text table: columns are (key, header); numbers right-aligned, text left-aligned.
    Columns with no value in any row are left out."""
    columns = [(key, header) for key, header in columns if any(r.get(key) is not None for r in rows)] or columns
    cells = [[fmt(r.get(key)) for key, _ in columns] for r in rows]
    headers = [h for _, h in columns]
    numeric = [all(isinstance(r.get(key), (int, float)) or r.get(key) is None for r in rows) for key, _ in columns]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(headers)]

    def line(values):
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    out = [title, line(headers), line(["-" * w for w in widths])] + [line(c) for c in cells]
    return "\n".join(out)
