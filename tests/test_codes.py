"""One table of the kernels' integer codes: the C++/CUDA header is generated from it."""

import pathlib

from expcuda import codes
from expcuda.quant.kinds import syq
from expcuda.nn import epilogue

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_the_committed_header_is_what_the_table_gives():
    """setup.py rewrites it before compiling; a hand edit of either side shows here."""
    assert (ROOT / "csrc" / "common" / "codes.h").read_text() == codes.header()


def test_every_python_user_reads_the_one_table():
    assert epilogue.COMBINES is codes.TABLES["Combine"]
    assert epilogue.A_QUANT_CODES is codes.TABLES["AQuant"]
    assert epilogue.PHI_CODES is codes.TABLES["Phi"]
    assert syq.GRANULARITY_CODE is codes.TABLES["Granularity"]


def test_the_header_names_every_code():
    text = codes.header()
    for enum, table in codes.TABLES.items():
        assert f"enum {enum} : int64_t" in text
        for name, value in table.items():
            assert f"k{''.join(p.capitalize() for p in name.split('_'))} = {value}" in text
