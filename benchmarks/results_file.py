"""Where the benchmarks leave their tables: printed, and written to benchmarks/results/."""

import pathlib

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def write(name: str, table: str) -> pathlib.Path:
    """Prints the markdown `table` and writes it to benchmarks/results/`name`."""
    text = table.rstrip("\n") + "\n"
    print(text, end="")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / name
    path.write_text(text)
    return path
