"""Issue 17, case 17: layout and reporting slips (reshard keeps what it is not asked to change, resume
says what it did, one output policy, splits, verify's default, plan --check's exit codes)."""

from __future__ import annotations

import json

from informative import informative_init
from test_cli import mzoo


def test_reshard_keeps_every_axis_and_the_format_it_is_not_asked_to_change(tmp_path):
    hf, legacy, out = (tmp_path / n for n in ("hf", "legacy", "out"))
    informative_init("mixtral-tiny", hf)
    mzoo("convert", "hf->megatron", hf, legacy, "--tp", "2", "--megatron-format", "torch", "--spec", "local")
    mzoo("reshard", legacy, out, "--ep", "4", "--quiet")
    info = json.loads(mzoo("inspect", out, "--json").stdout)
    assert (info["format"], info["tp"], info["pp"], info["ep"], info["spec"]) == ("torch", 2, 1, 4, "local")
    back = tmp_path / "back"
    mzoo("reshard", out, back, "--tp", "1", "--megatron-format", "torch_dist", "--quiet")
    info = json.loads(mzoo("inspect", back, "--json").stdout)
    assert (info["format"], info["tp"], info["ep"], info["spec"]) == ("torch_dist", 1, 4, "local")
