"""Property-based: generated bad configs, values and files for all five commands.

Every generated input is wrong by construction (a value outside its documented range, an unknown key,
a file that is not a YAML mapping...). Each must end with exit code 2, exactly one line on stderr that
starts ``modulemesh COMMAND: error:``, no traceback (an exception escaping ``main`` fails the test), and
no ``--out`` directory created: input is validated before any output is written. A "silent accept" (exit 0)
fails too. The commands run in process on the digits data set; bad input is refused within milliseconds.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modulemesh.cli import main

# Fixed examples (derandomize) keep CI reproducible; MODULEMESH_FUZZ_EXAMPLES=1000 explores further by hand.
EXAMPLES = int(os.environ.get("MODULEMESH_FUZZ_EXAMPLES", "36"))
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    database=None,
    derandomize=not os.environ.get("MODULEMESH_FUZZ_EXAMPLES"),
)
TINY = {
    "data": {"name": "digits"},
    "scenario": {"n_tasks": 5, "max_train_per_task": 20, "max_test_per_task": 20},
    "train": {"epochs": 1, "batch_size": 16},
}


def refuse(argv: list[str], out: Path, names: tuple[str, ...] = ()) -> str:
    """Run the CLI; assert one line, exit 2, naming one of ``names`` (the culprit), and --out left alone."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(argv)
    lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
    assert rc == 2, f"accepted (exit {rc}): {argv}\n{err.getvalue()[-2000:]}"
    assert len(lines) == 1 and lines[0].startswith(f"modulemesh {argv[0]}: error: "), (argv, lines)
    assert "Traceback" not in err.getvalue()
    assert not names or any(n in lines[0] for n in names), f"refused for another reason than {names}: {lines[0]}"
    assert not out.exists() or not any(out.iterdir()), f"{out} was written before the input was validated: {argv}"
    return lines[0]


# ---------------------------------------------------------------- generators

negative_or_zero = st.integers(-(10**6), 0)
non_positive_float = st.floats(max_value=0, allow_nan=False, allow_infinity=False) | st.just(float("nan"))
wrong_type = st.one_of(
    st.lists(st.integers(), min_size=1, max_size=3),
    st.dictionaries(st.text(min_size=1, max_size=4), st.integers(), min_size=1, max_size=2),
    st.text(alphabet="abcxyz", min_size=1, max_size=6),
)
identifier = st.from_regex(r"[a-z][a-z_]{2,10}", fullmatch=True)


def unknown_key(section: str, valid: set[str]):
    return identifier.filter(lambda k: k not in valid).map(lambda k: (f"{section}.{k}", 1))


BAD_RUN_VALUES = st.one_of(
    st.tuples(
        st.sampled_from(
            [
                "train.epochs",
                "train.batch_size",
                "train.eval_batch_size",
                "scenario.n_tasks",
                "router.hidden",
                "router.components",
            ]
        ),
        negative_or_zero,
    ),
    st.tuples(st.sampled_from(["train.lr", "router.temperature"]), non_positive_float),
    st.tuples(st.just("scenario.val_fraction"), st.floats(1.0, 1e6) | st.floats(-1e6, -1e-6)),
    st.tuples(st.just("scenario.n_tasks"), st.integers(1001, 10**9)),
    st.tuples(st.sampled_from(["train.epochs", "scenario.n_tasks", "train.lr", "router.k"]), wrong_type),
    st.tuples(st.sampled_from(["router.type", "scenario.kind", "train.optimizer"]), identifier),
    st.tuples(st.just("router.k"), st.integers(6, 10**4)),  # 5 tasks -> at most 5 experts
    st.tuples(st.just("device"), identifier.filter(lambda s: s not in ("auto", "cpu") and not s.startswith("cuda"))),
    st.tuples(
        st.just("data.name"),
        identifier.filter(
            lambda s: (
                s not in ("digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "svhn", "kmnist", "emnist", "usps")
            )
        ),
    ),
    unknown_key(
        "train",
        {"epochs", "batch_size", "eval_batch_size", "count_flops", "lr", "optimizer", "momentum", "weight_decay"},
    ),
    unknown_key(
        "router",
        {
            "type",
            "k",
            "temperature",
            "hidden",
            "renormalize",
            "components",
            "specialization_weight",
            "load_balance_weight",
            "sparsity_weight",
        },
    ),
    identifier.filter(
        lambda k: k not in ("name", "seed", "device", "data", "scenario", "expert", "router", "strategy", "train")
    ).map(lambda k: (k, 1)),
)


def broken_file_bytes():
    """Contents no config loader may accept: empty, binary, NUL, non-mapping YAML, truncated YAML."""
    valid = yaml.safe_dump(TINY, default_flow_style=True).strip()  # one flow mapping: any proper prefix is invalid
    return st.one_of(
        st.sampled_from([b"", b"\n", b"   \n\t\n", b"# only a comment\n", b"---\n", b"~\n", b"null\n"]),
        st.binary(min_size=1, max_size=64).map(lambda b: b"\x00" + b),
        st.binary(min_size=1, max_size=64).map(lambda b: b"\xff\xfe" + b),
        st.lists(st.integers(), max_size=4).map(lambda v: yaml.safe_dump(v).encode()),
        st.one_of(st.integers(), st.text(alphabet="abc ", min_size=1, max_size=8).filter(str.strip)).map(
            lambda v: yaml.safe_dump(v).encode()
        ),
        st.integers(1, len(valid) - 1).map(lambda n: valid[:n].encode()),
    )


def nested(key: str, value) -> dict:
    out: dict = {}
    node = out
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def merged(base: dict, extra: dict) -> dict:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for k, v in extra.items():
        out[k] = merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def config_file(tmp: Path, content: bytes | dict) -> Path:
    path = tmp / "config.yaml"
    path.write_bytes(content if isinstance(content, bytes) else yaml.safe_dump(content).encode())
    return path


def culprit(pair) -> tuple[str, ...]:
    """What the refusal must name: the key (its last part) or the bad value itself."""
    key, value = pair
    return (key.split(".")[-1], str(value)) if value is not None else (key,)


def bad_value_argv(tmp: Path, pair, via_file: bool, base: dict) -> list[str]:
    """A bad (key, value) delivered inside the YAML file or as ``--set key=value``."""
    key, value = pair
    if value is None:  # the key is removed, not set
        return [str(config_file(tmp, {k: v for k, v in base.items() if k != key}))]
    if via_file:
        return [str(config_file(tmp, merged(base, nested(key, value))))]
    return [
        str(config_file(tmp, base)),
        "--set",
        f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}",
    ]


# ---------------------------------------------------------------- run and compare


@SETTINGS
@given(pair=BAD_RUN_VALUES, via_file=st.booleans())
def test_run_refuses_generated_bad_values(pair, via_file):
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        refuse(
            ["run", *bad_value_argv(tmp, pair, via_file, TINY), "--quiet", "--out", str(tmp / "out")],
            tmp / "out",
            culprit(pair),
        )


@SETTINGS
@given(
    pair=BAD_RUN_VALUES, via_file=st.booleans(), strategies=st.sampled_from(["modulemesh,er", "finetune,modulemesh"])
)
def test_compare_refuses_generated_bad_values(pair, via_file, strategies):
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        argv = [
            "compare",
            *bad_value_argv(tmp, pair, via_file, TINY),
            "--strategies",
            strategies,
            "--seeds",
            "1",
            "--quiet",
        ]
        refuse([*argv, "--out", str(tmp / "out")], tmp / "out", culprit(pair))


@SETTINGS
@given(content=broken_file_bytes(), command=st.sampled_from(["run", "compare", "federate", "m2mkd", "upgrade"]))
def test_every_command_refuses_broken_config_files(content, command):
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        path = str(config_file(tmp, content))
        argv = {
            "upgrade": [
                "upgrade",
                "--from",
                str(tmp / "old"),
                "--to",
                path,
                "--train-teacher",
                path,
                "--data",
                "digits",
            ]
        }.get(command, [command, path])
        refuse([*argv, "--quiet", "--out", str(tmp / "out")], tmp / "out", ("config.yaml",))


# ---------------------------------------------------------------- federate, upgrade, m2mkd

FED_BASE = {
    "data": {"name": "digits"},
    "federation": {
        "mode": "fedavg",
        "clients": 3,
        "rounds": 1,
        "max_train": 200,
        "backbone": {"type": "mlp", "hidden": [8]},
    },
}
BAD_FED_VALUES = st.one_of(
    st.tuples(
        st.sampled_from(
            [
                "federation.clients",
                "federation.rounds",
                "federation.batch_size",
                "federation.min_client_size",
                "federation.distill.proxy_size",
                "federation.modules.modules_per_peer",
            ]
        ),
        negative_or_zero,
    ),
    st.tuples(
        st.sampled_from(
            [
                "federation.alpha",
                "federation.lr",
                "federation.local_epochs",
                "federation.distill.tau",
                "federation.modules.temperature",
            ]
        ),
        non_positive_float,
    ),
    st.tuples(
        st.sampled_from(
            [
                "federation.mode",
                "federation.partition",
                "federation.engine",
                "federation.modules.topology",
                "federation.distill.robust",
            ]
        ),
        identifier,
    ),
    st.tuples(st.just("federation.codec"), identifier.filter(lambda s: s not in ("fp32", "fp16", "int8"))),
    st.tuples(st.just("federation.momentum"), st.floats(1.0, 1e6)),
    st.tuples(st.sampled_from(["federation.clients", "federation.rounds", "seed"]), wrong_type),
    unknown_key(
        "federation",
        {
            "mode",
            "engine",
            "clients",
            "rounds",
            "partition",
            "alpha",
            "min_client_size",
            "max_train",
            "max_test",
            "local_epochs",
            "batch_size",
            "lr",
            "momentum",
            "backbone",
            "codec",
            "distill",
            "modules",
        },
    ),
)


@SETTINGS
@given(pair=BAD_FED_VALUES, via_file=st.booleans())
def test_federate_refuses_generated_bad_values(pair, via_file):
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        refuse(
            ["federate", *bad_value_argv(tmp, pair, via_file, FED_BASE), "--quiet", "--out", str(tmp / "out")],
            tmp / "out",
            culprit(pair),
        )


UPGRADE_BASE = {"backbone": {"type": "mlp", "hidden": [8]}, "train": {"steps": 0}}
BAD_UPGRADE_VALUES = st.one_of(
    st.tuples(st.sampled_from(["train.steps"]), st.integers(-(10**6), -1)),
    st.tuples(st.sampled_from(["train.batch_size", "train.eval_every", "transfer.fisher_samples"]), negative_or_zero),
    st.tuples(
        st.sampled_from(["transfer.beta", "distill.alpha", "target_fraction"]),
        st.floats(1.0001, 1e6) | st.floats(-1e6, -1e-6),
    ),
    st.tuples(st.sampled_from(["distill.temperature", "train.lr"]), non_positive_float),
    st.tuples(st.just("transfer.top_q"), st.floats(1.0001, 1e3) | non_positive_float),
    unknown_key(
        "transfer", {"beta", "tau", "top_q", "fisher_samples", "fisher_batch_size", "fit_samples", "method", "mapping"}
    ),
    st.just(("backbone", None)),  # the one required key, removed
)


@SETTINGS
@given(pair=BAD_UPGRADE_VALUES, via_file=st.booleans())
def test_upgrade_refuses_generated_bad_values(pair, via_file):
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        to = bad_value_argv(tmp, pair, via_file, UPGRADE_BASE)
        refuse(
            [
                "upgrade",
                "--from",
                str(tmp / "old"),
                "--to",
                *to,
                "--data",
                "digits",
                "--quiet",
                "--out",
                str(tmp / "out"),
            ],
            tmp / "out",
            culprit(pair),
        )


M2MKD_BASE = {"data": {"name": "digits"}}
BAD_M2MKD_VALUES = st.one_of(
    st.tuples(st.sampled_from(["optim.batch_size", "teacher.incubate_steps"]), negative_or_zero),
    st.tuples(st.sampled_from(["distill.steps", "meta.steps", "assemble.finetune_steps"]), st.integers(-(10**6), -1)),
    st.tuples(st.sampled_from(["optim.lr", "distill.temperature", "meta.mlp_ratio"]), non_positive_float),
    st.tuples(st.sampled_from(["optim.warmup"]), st.floats(1.0, 1e6) | st.floats(-1e6, -1e-6)),
    st.tuples(st.sampled_from(["distill.alpha"]), st.floats(1.0001, 1e6)),
    unknown_key("distill", {"steps", "alpha", "temperature", "feature_weight", "boundary_weight", "lr"}),
)


@SETTINGS
@given(pair=BAD_M2MKD_VALUES, via_file=st.booleans())
def test_m2mkd_refuses_generated_bad_values(pair, via_file):
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        refuse(
            ["m2mkd", *bad_value_argv(tmp, pair, via_file, M2MKD_BASE), "--quiet", "--out", str(tmp / "out")],
            tmp / "out",
            culprit(pair),
        )


@settings(
    max_examples=max(25, EXAMPLES * 2 // 3),
    deadline=None,
    database=None,
    derandomize=not os.environ.get("MODULEMESH_FUZZ_EXAMPLES"),
)
@given(
    spec=st.one_of(
        st.tuples(st.sampled_from(["dim", "depth", "heads", "experts", "k", "patch"]), st.integers(-1000, 0)).map(
            lambda kv: f"vit:{kv[0]}={kv[1]}"
        ),
        identifier.filter(lambda s: s not in ("vit", "moe_vit", "mlp", "cnn")).map(lambda s: f"{s}:dim=8"),
        st.tuples(identifier, st.integers(1, 9))
        .filter(lambda kv: kv[0] not in ("dim", "depth", "heads", "experts", "k", "patch", "mlp_ratio", "type"))
        .map(lambda kv: f"vit:{kv[0]}={kv[1]}"),
    )
)
def test_m2mkd_refuses_generated_bad_model_specs(spec):
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        refuse(
            ["m2mkd", str(config_file(tmp, M2MKD_BASE)), "--student", spec, "--quiet", "--out", str(tmp / "out")],
            tmp / "out",
            (spec.split(":")[0], spec.split(":")[-1].split("=")[0]),
        )
