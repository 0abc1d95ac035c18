"""Fuzzing of the input parsers with hypothesis: only the documented errors ever escape.

Documented errors: :class:`qsmdask.io.nifti.InputError` (a ``ValueError`` naming the file) for
files, ``ValueError`` for labels. Anything else (IndexError, KeyError, TypeError, struct.error,
zlib.error, MemoryError ...) escaping a parser is a bug.
"""

from __future__ import annotations

import gzip
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qsmdask.io.bids import (find_subject_sessions, parse_bids_name, read_participants, read_sessions,
                             validate_label)
from qsmdask.io.nifti import InputError, load_nifti, read_json, save_nifti

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                         HealthCheck.too_slow])
SMALL = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                         HealthCheck.too_slow])

_NAME_ALPHABET = st.sampled_from(list("sub-ses_echopartmagMEGRE0123456789.niigzjsontsv/\\ -_.") + ["..", "\x00", "é"])


# ---------------------------------------------------------------------------------------------- names
@FUZZ
@given(st.one_of(st.text(max_size=60), st.lists(_NAME_ALPHABET, max_size=30).map("".join)))
def test_parse_bids_name_only_input_error(name):
    try:
        ents, suffix, ext = parse_bids_name(name)
    except InputError as e:
        assert e.problem and "not a BIDS file name" in e.problem
        return
    # whatever parses is well formed
    assert "sub" in ents and ext in (".nii.gz", ".nii", ".json", ".tsv")
    assert suffix.isalnum() and all(v.isalnum() and k.isalpha() for k, v in ents.items())


@FUZZ
@given(st.builds(lambda s, e, p: f"sub-{s}_echo-{e}_part-{p}_MEGRE.nii.gz",
                 st.from_regex(r"[A-Za-z0-9]{1,8}", fullmatch=True), st.integers(1, 99),
                 st.sampled_from(["mag", "phase"])))
def test_parse_bids_name_roundtrip(name):
    ents, suffix, ext = parse_bids_name(name)
    assert suffix == "MEGRE" and ext == ".nii.gz" and ents["part"] in ("mag", "phase")
    assert f"sub-{ents['sub']}_echo-{ents['echo']}_part-{ents['part']}_MEGRE.nii.gz" == name


@FUZZ
@given(st.one_of(st.text(max_size=40), st.lists(_NAME_ALPHABET, max_size=20).map("".join), st.integers(),
                 st.none(), st.binary(max_size=8)))
def test_validate_label_never_lets_a_path_through(label):
    try:
        out = validate_label(label)
    except ValueError as e:
        assert "participant label" in str(e)
        return
    assert out.isascii() and out.isalnum()
    assert "/" not in out and "\\" not in out and ".." not in out and "\x00" not in out


# ---------------------------------------------------------------------------------------------- TSV
_TSV_TOKENS = st.sampled_from(["participant_id", "group", "age", "hdrs", "crp", "session_id", "sub-01",
                               "sub-02", "sub-01", "ses-pre", "patient", "control", "n/a", "", "30",
                               "1e3", "nan", "inf", "-", "\t", "\t", "\n", "\n", "\r\n", '"', "'",
                               "x\ty", "é", "\x00", "sub-../x", "  "])


@st.composite
def tsv_bytes(draw):
    if draw(st.booleans()):
        return draw(st.binary(max_size=300))
    text = "".join(draw(st.lists(_TSV_TOKENS, max_size=40)))
    enc = draw(st.sampled_from(["utf-8", "utf-16", "latin-1"]))
    return text.encode(enc, errors="replace")


@FUZZ
@given(data=tsv_bytes())
def test_read_participants_random_bytes(tmp_path, data):
    (tmp_path / "participants.tsv").write_bytes(data)
    try:
        df = read_participants(tmp_path)
    except InputError as e:
        assert e.path.endswith("participants.tsv")
        return
    # accepted tables satisfy the documented contract
    assert {"participant_id", "group"} <= set(df.columns)
    assert df["participant_id"].is_unique
    assert df["participant_id"].str.fullmatch(r"sub-[A-Za-z0-9]+").all()
    for c in ("age", "hdrs", "crp"):
        if c in df.columns:
            assert df[c].dtype == float


@FUZZ
@given(data=tsv_bytes())
def test_read_sessions_random_bytes(tmp_path, data):
    sub = tmp_path / "sub-01"
    sub.mkdir(exist_ok=True)
    (sub / "sub-01_sessions.tsv").write_bytes(data)
    try:
        df = read_sessions(tmp_path)
    except InputError as e:
        assert e.path.endswith("sub-01_sessions.tsv")
        return
    assert "session_id" in df.columns and (df["participant_id"] == "sub-01").all()


# ---------------------------------------------------------------------------------------------- JSON
_JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True)
                            | st.text(max_size=10),
                            lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                            max_leaves=8)


@st.composite
def sidecar_bytes(draw):
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return draw(st.binary(max_size=200))
    if kind == 1:
        return draw(st.text(max_size=200)).encode("utf-8", errors="surrogatepass")
    obj = {"EchoTime": draw(_JSON_VALUES | st.floats(-1, 1)),
           "MagneticFieldStrength": draw(_JSON_VALUES | st.floats(-30, 30))}
    for k in list(obj):
        if draw(st.booleans()) and kind == 3:
            del obj[k]
    if draw(st.booleans()):
        obj = draw(st.sampled_from([[obj], "x", 3, None, obj]))
    return json.dumps(obj, allow_nan=True).encode()


@FUZZ
@given(data=sidecar_bytes())
def test_read_json_random_bytes(tmp_path, data):
    p = tmp_path / "x.json"
    p.write_bytes(data)
    try:
        obj = read_json(p)
    except InputError as e:
        assert e.path == str(p)
        return
    assert isinstance(obj, dict)


@pytest.fixture(scope="module")
def bids_template(tmp_path_factory):
    from .conftest import write_megre_subject
    root = tmp_path_factory.mktemp("fuzzbids") / "bids"
    root.mkdir()
    (root / "dataset_description.json").write_text('{"Name": "f", "BIDSVersion": "1.9.0"}')
    write_megre_subject(root, "01", n_echoes=1, shape=(8, 8, 8))
    return root


@SMALL
@given(data=sidecar_bytes(), which=st.sampled_from(["phase", "mag"]))
def test_sidecar_fields_checked_through_discovery(bids_template, data, which):
    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "bids"
        shutil.copytree(bids_template, root)
        side = root / f"sub-01/anat/sub-01_echo-1_part-{which}_MEGRE.json"
        side.write_bytes(data)
        try:
            sss = find_subject_sessions(root)
        except InputError as e:
            assert "sub-01" in e.path or e.path.endswith(".json")
            return
        # accepted: the values that reach the pipeline are plausible numbers
        e = sss[0].echoes[0]
        assert isinstance(e.echo_time_s, float) and 1e-4 <= e.echo_time_s <= 0.2
        assert isinstance(e.b0_tesla, float) and 0.1 <= e.b0_tesla <= 20.0


# ---------------------------------------------------------------------------------------------- NIfTI
@pytest.fixture(scope="module")
def nifti_bytes(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzznii")
    x = np.random.default_rng(0).uniform(-3, 3, (6, 5, 4)).astype(np.float32)
    plain = save_nifti(d / "a.nii", x, np.diag([1.0, 1.5, 2.0, 1.0])).read_bytes()
    return plain, gzip.compress(plain, mtime=0)


@st.composite
def corruption(draw, n):
    kind = draw(st.sampled_from(["flip", "header", "truncate", "append"]))
    if kind == "truncate":
        return kind, [draw(st.integers(0, n - 1))]
    if kind == "append":
        return kind, [draw(st.integers(1, 64))]
    hi = 352 if kind == "header" else n
    return kind, draw(st.lists(st.tuples(st.integers(0, min(hi, n) - 1), st.integers(1, 255)),
                               min_size=1, max_size=8))


def _corrupt(raw: bytes, spec) -> bytes:
    kind, args = spec
    if kind == "truncate":
        return raw[: args[0]]
    if kind == "append":
        return raw + b"\x00" * args[0]
    b = bytearray(raw)
    for pos, mask in args:
        b[pos] ^= mask
    return bytes(b)


def _check_load(path):
    try:
        data, aff, _ = load_nifti(path, ndim=3)
    except InputError as e:
        assert e.path == str(path) and e.problem
        return
    assert data.ndim == 3 and np.all(np.isfinite(data))
    assert aff.shape == (4, 4) and np.all(np.isfinite(aff))


@FUZZ
@given(spec=st.data())
def test_load_nifti_header_corruption_plain(tmp_path, nifti_bytes, spec):
    raw = nifti_bytes[0]
    s = spec.draw(corruption(len(raw)))
    p = tmp_path / "c.nii"
    p.write_bytes(_corrupt(raw, s))
    _check_load(p)


@FUZZ
@given(spec=st.data(), where=st.sampled_from(["gz", "inner"]))
def test_load_nifti_corruption_gz(tmp_path, nifti_bytes, spec, where):
    plain, gz = nifti_bytes
    if where == "gz":  # damage the compressed stream itself
        payload = _corrupt(gz, spec.draw(corruption(len(gz))))
    else:  # a valid gzip of a damaged image
        payload = gzip.compress(_corrupt(plain, spec.draw(corruption(len(plain)))), mtime=0)
    p = tmp_path / "c.nii.gz"
    p.write_bytes(payload)
    _check_load(p)
