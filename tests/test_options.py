"""Each option is declared once: a CapConfig / TrainConfig field's metadata holds its flag, help
and section, and the compress, train and bench parsers, the values they pass on, the flag an
error names and the bench's method options are generated from it."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from caproj.bench import parse_method
from caproj.cli import (
    build_parser,
    command_parser,
    config_flags,
    config_options,
    flags_of,
    translate,
)
from caproj.config import CapConfig, TrainConfig
from caproj.errors import CaprojError

COMMANDS = {"compress": (CapConfig, TrainConfig), "bench": (CapConfig, TrainConfig),
            "train": (TrainConfig,)}
REQUIRED = {"compress": ["--weights", "w.th", "--data", "digits", "--out", "o.pt"],
            "bench": ["--weights", "w.th", "--data", "digits", "--out-dir", "b"],
            "train": ["--data", "digits", "--out", "o.pt"]}


def _declared(cls: type) -> dict[str, str]:
    return {f.name: f.metadata["flag"] for f in dataclasses.fields(cls) if "flag" in f.metadata}


def _value(cls: type, name: str) -> tuple[list[str], object]:
    """Arguments that give field `name` a value other than its default, and that value."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    t = typing.get_type_hints(cls)[name]
    if bool in (t, *typing.get_args(t)):
        return [], not f.default  # the flag alone (True), or --no-flag where True is default
    if f.metadata["choices"]:
        v = next(c for c in f.metadata["choices"] if c != f.default)
        return [v], v
    if int in (t, *typing.get_args(t)) and float not in (t, *typing.get_args(t)):
        return ["7"], 7
    return ["0.25"], 0.25


def test_flags_are_unique_across_the_configs():
    flags = [*_declared(CapConfig).values(), *_declared(TrainConfig).values()]
    assert len(flags) == len(set(flags))
    assert len(flags) >= 30


@pytest.mark.parametrize("cmd", list(COMMANDS))
def test_every_exposed_field_has_exactly_one_flag_and_each_flag_one_field(cmd):
    p = command_parser(build_parser(), cmd)
    by_field = config_flags(p)
    want = {(cls.__name__, n) for cls in COMMANDS[cmd] for n in _declared(cls)}
    assert set(by_field) == want  # every declared field has a flag, nothing else does
    seen: dict[str, str] = {}
    for a in p._actions:
        for o in a.option_strings:
            assert o not in seen, f"{o} is declared twice"
            seen[o] = a.dest
    for (cls_name, name), flag in by_field.items():
        cls = CapConfig if cls_name == "CapConfig" else TrainConfig
        args, value = _value(cls, name)
        opt = flag if value is not False else flag.replace("--", "--no-", 1)
        ns = build_parser().parse_args([cmd, *REQUIRED[cmd], opt, *args])
        given = {c.__name__: {k: v for k, v in config_options(ns, c).items()
                              if (c.__name__, k) != ("TrainConfig", "epochs") or k == name}
                 for c in (CapConfig, TrainConfig)}
        assert given == {cls_name: {name: value},
                         ({"CapConfig", "TrainConfig"} - {cls_name}).pop(): {}}, flag


def test_unset_flags_pass_nothing_so_presets_and_defaults_apply():
    ns = build_parser().parse_args(["compress", *REQUIRED["compress"]])
    assert config_options(ns, CapConfig) == {}
    assert config_options(ns, TrainConfig) == {"epochs": 0}  # compress: no fine-tuning
    ns = build_parser().parse_args(["bench", *REQUIRED["bench"]])
    assert config_options(ns, TrainConfig) == {"epochs": 1}
    ns = build_parser().parse_args(["train", *REQUIRED["train"]])
    assert config_options(ns, TrainConfig) == {}  # TRAIN's 3 epochs


def test_error_messages_name_the_commands_flags():
    p = command_parser(build_parser(), "compress")
    flags = flags_of(p)
    assert flags["weight_lr"] == "--cap-weight-lr" and flags["kd_weight"] == "--kd"
    assert flags["allocation"] == "--allocate" and "lr" not in flags  # CaP's and FT's lr
    msg = translate(CaprojError("target_macs 0.01 is unreachable with stream_projection=True; "
                                "pass image_size=N or keep"), flags)
    assert msg == "--target-macs 0.01 is unreachable with --stream-projection; pass " \
                  "--image-size N or --keep"


def test_bench_method_options_are_the_flags_without_dashes():
    for cls, part in ((CapConfig, "cap"), (TrainConfig, "finetune")):
        for name, flag in _declared(cls).items():
            args, value = _value(cls, name)
            spec = parse_method(f"cap:{flag[2:]}" + (f"={args[0]}" if args else "")
                                if value is not False else f"cap:{flag[2:]}=false")
            assert getattr(spec, part) == {name: value}, flag
