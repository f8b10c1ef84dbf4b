"""Bundles that are corrupt, of another version, or for another base are refused, by name."""
import json
import os

import numpy as np
import pytest

from tvswitch.errors import BundleError, TvswitchError
from tvswitch.runtime.bundle import Bundle
from tvswitch.runtime.rebuild import CpuRebuilder


def _header_len(path):
    with open(path, "rb") as f:
        return int.from_bytes(f.read(8), "little")


def test_a_good_bundle_opens_and_reports_sizes(bundle_factory):
    b = bundle_factory("tvq", bits=2)
    assert b.tasks == ["a", "b", "c"]
    assert b.num_shared_params == 37 * 29 + 37 + 53 * 37 + 53 + 7 * 13 + 11
    assert b.packed_nbytes > 0 and b.file_nbytes == os.path.getsize(b.path)
    assert set(b.task_specific("b")) == {"head.weight"}
    assert b.task_specific("b")["head.weight"].shape == (4, 53)


def test_truncated_bundle_is_refused(bundle_factory, tmp_path):
    b = bundle_factory()
    data = open(b.path, "rb").read()
    for cut in (4, 100, len(data) - 1):
        p = tmp_path / ("cut%d.tvs" % cut)
        p.write_bytes(data[:cut])
        with pytest.raises(BundleError, match=str(p)):
            Bundle.open(str(p))


def test_bit_flip_in_a_payload_is_refused(bundle_factory, tmp_path):
    b = bundle_factory("rtvq")
    data = bytearray(open(b.path, "rb").read())
    start = 8 + _header_len(b.path)
    for offset in (start + 3, len(data) - 2):
        flipped = bytearray(data)
        flipped[offset] ^= 0x10
        p = tmp_path / "flip.tvs"
        p.write_bytes(bytes(flipped))
        with pytest.raises(BundleError, match="CRC-32"):
            Bundle.open(str(p))


def test_bit_flip_in_the_manifest_is_refused(bundle_factory, tmp_path):
    b = bundle_factory()
    data = bytearray(open(b.path, "rb").read())
    header = bytes(data[8:8 + _header_len(b.path)])
    at = header.index(b'\\"bits\\":') + len(b'\\"bits\\":')  # a width inside the manifest string
    data[8 + at] ^= 0x01
    p = tmp_path / "manifest.tvs"
    p.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="manifest checksum"):
        Bundle.open(str(p))


def _rewrite_manifest(src, dst, edit):
    from safetensors.numpy import load_file, save_file
    from safetensors import safe_open
    import hashlib

    with safe_open(src, framework="numpy") as f:
        meta = f.metadata()
    m = json.loads(meta["tvswitch.manifest"])
    edit(m)
    text = json.dumps(m)
    save_file(load_file(src), dst, metadata={"tvswitch.manifest": text,
                                             "tvswitch.manifest.sha256": hashlib.sha256(text.encode()).hexdigest()})


def test_other_version_is_refused(bundle_factory, tmp_path):
    b = bundle_factory()
    p = str(tmp_path / "v2.tvs")
    _rewrite_manifest(b.path, p, lambda m: m.update(version=2))
    with pytest.raises(BundleError, match="version 2"):
        Bundle.open(p)


def test_inconsistent_manifest_is_refused(bundle_factory, tmp_path):
    b = bundle_factory("tvq", bits=4)
    p = str(tmp_path / "lie.tvs")

    def lie(m):  # claim 3-bit codes for a 4-bit stream
        m["entries"]["a"]["enc.weight"]["terms"][0]["bits"] = 3
    _rewrite_manifest(b.path, p, lie)
    with pytest.raises(BundleError, match="3-bit stream"):
        Bundle.open(p)


def test_out_of_range_group_is_refused(bundle_factory, tmp_path):
    """decode.h indexes groups with 32 bits: a larger group would divide by its low bits."""
    b = bundle_factory("tvq", bits=4)
    p = str(tmp_path / "group.tvs")

    def lie(m):
        m["entries"]["a"]["enc.weight"]["terms"][0]["group"] = 2**32 + 5
    _rewrite_manifest(b.path, p, lie)
    with pytest.raises(BundleError, match="bad group size"):
        Bundle.open(p)


@pytest.mark.parametrize("scheme,settings,layout", [("tswitch", dict(keep=0.1), "groups"),
                                                     ("tswitch", dict(keep=0.1), "sparse"),
                                                     ("tvq", dict(bits=2), "sparse")])
def test_a_group_index_that_disagrees_with_its_groups_is_refused_though_its_crc_is_right(
        bundle_factory, legacy_tswitch, tmp_path, scheme, settings, layout):
    """The decoders find a stored group by counting flags: an index whose counts lie would
    send them past the stored groups, so the reader recounts every one (the groups layout:
    T-Switch as bundles written before its ternary codes hold it)."""
    import zlib

    from safetensors.numpy import load_file, save_file
    from safetensors import safe_open
    import hashlib

    if layout == "groups":
        b = legacy_tswitch(bundle_factory(scheme, layout="streams", **settings), str(tmp_path / "groups.tvs"))
    else:
        b = bundle_factory(scheme, layout="compact", **settings)
    term = b.entries("a")["mlp.weight"].terms[0]
    assert term.layout == layout
    tensors = load_file(b.path)
    with safe_open(b.path, framework="numpy") as f:
        m = json.loads(f.metadata()["tvswitch.manifest"])
    index = tensors[term.mask].copy()
    index[-1] ^= 1 << 31  # a flag more in the last block: one group's byte that is not there
    tensors[term.mask] = index
    m["payloads"][term.mask]["crc32"] = zlib.crc32(index.tobytes())
    text = json.dumps(m)
    p = str(tmp_path / "index.tvs")
    save_file(tensors, p, metadata={"tvswitch.manifest": text,
                                    "tvswitch.manifest.sha256": hashlib.sha256(text.encode()).hexdigest()})
    with pytest.raises(BundleError, match="%s term of a/mlp.weight: index flags a group past" % layout):
        Bundle.open(p)


@pytest.mark.parametrize("scheme,edit,says", [
    ("tswitch", dict(layout="rows"), "term layout must be one of streams, groups, sparse"),
    ("tswitch", dict(bits=2), "groups layout holds masked 1-bit codes only"),
    ("tswitch", dict(fill=0), "a fill code outside the sparse layout"),
    ("tvq", dict(fill=4), "a sparse term needs its group index and a fill code of 2 bits"),
    ("tvq", dict(fill=True), "a sparse term needs its group index and a fill code of 2 bits"),
    ("raw", dict(fill=0), "a raw term with a layout or fill"),
])
def test_a_bad_term_layout_is_refused(bundle_factory, legacy_tswitch, tmp_path, scheme, edit, says):
    if scheme == "tswitch":  # a groups term (T-Switch of an older bundle)
        b = legacy_tswitch(bundle_factory(scheme, keep=0.1, layout="streams"), str(tmp_path / "groups.tvs"))
    else:
        b = bundle_factory("tvq", bits=2, layout="compact")
    name = "mlp.weight"
    if scheme == "raw":  # a tensor stored as-is (norm statistics)
        name = next(k for k, e in b.entries("a").items() if e.terms[0].kind == "raw")
    p = str(tmp_path / "layout.tvs")
    _rewrite_manifest(b.path, p, lambda m: m["entries"]["a"][name]["terms"][0].update(edit))
    with pytest.raises(BundleError, match=says):
        Bundle.open(p)


def test_wrong_base_is_refused_before_any_write(bundle_factory, checkpoints):
    base, fts = checkpoints
    b = bundle_factory()
    r = CpuRebuilder(b, base)
    out = r.allocate()
    r.rebuild({"a": 1.0}, out)
    before = {k: v.copy() for k, v in out.items()}
    with pytest.raises(BundleError, match="fingerprint"):
        CpuRebuilder(b, fts["a"])
    wrong_shape = dict(base, **{"enc.weight": np.zeros((29, 37), np.float32)})
    with pytest.raises(BundleError, match="enc.weight"):
        CpuRebuilder(b, wrong_shape)
    for k in out:
        assert np.array_equal(out[k], before[k])


def test_missing_file_and_non_bundle(tmp_path):
    with pytest.raises(TvswitchError, match="no such bundle"):
        Bundle.open(str(tmp_path / "nope.tvs"))
    from safetensors.numpy import save_file
    p = str(tmp_path / "plain.safetensors")
    save_file({"x": np.zeros(3, np.float32)}, p)
    with pytest.raises(BundleError, match="no manifest"):
        Bundle.open(p)


def test_entropy_coding_round_trips_and_shrinks(tmp_path):
    from tvswitch.export.exporter import export_bundle

    rng = np.random.default_rng(0)
    base = {"w": rng.normal(0, 1, (200, 300)).astype(np.float32)}
    fts = {t: {"w": base["w"] + rng.normal(0, 0.01, (200, 300)).astype(np.float32)} for t in "ab"}
    plain = export_bundle(base, fts, str(tmp_path / "p.tvs"), name="tswitch", keep=0.1)
    coded = export_bundle(base, fts, str(tmp_path / "z.tvs"), name="tswitch", keep=0.1, entropy="lzma")
    assert coded.file_nbytes < plain.file_nbytes
    outs = []
    for b in (plain, coded):
        r = CpuRebuilder(b, base)
        o = r.allocate()
        r.rebuild({"b": 1.0}, o)
        outs.append(o)
    for k in outs[0]:
        assert np.array_equal(outs[0][k], outs[1][k])


def test_add_and_remove_task_carry_other_payloads_over(tmp_path, checkpoints):
    from tvswitch.export.edit import add_task, remove_task
    from tvswitch.export.exporter import export_bundle

    base, fts = checkpoints
    for scheme in ("tvq", "rtvq"):
        two = export_bundle(base, {"a": fts["a"], "b": fts["b"]}, str(tmp_path / "two.tvs"), name=scheme)
        r = CpuRebuilder(two, base)
        want = r.allocate()
        r.rebuild({"a": 1.0}, want)
        three = add_task(two.path, "c", fts["c"], base, out=str(tmp_path / "three.tvs"))
        assert three.tasks == ["a", "b", "c"]
        for key in two.manifest["payloads"]:
            assert np.array_equal(three.payload(key), two.payload(key))
        r3 = CpuRebuilder(three, base)
        got, c = r3.allocate(), r3.allocate()
        r3.rebuild({"a": 1.0}, got)
        r3.rebuild({"c": 1.0}, c)
        for k in want:
            assert np.array_equal(got[k], want[k])
            assert np.allclose(c[k], fts["c"][k], atol=0.05)
        back = remove_task(three.path, "c", out=str(tmp_path / "back.tvs"))
        assert back.tasks == ["a", "b"]
        assert set(back.manifest["payloads"]) == set(two.manifest["payloads"])


@pytest.mark.parametrize("embed", ["float16", "float32"])
def test_add_task_to_a_bundle_with_an_embedded_base(tmp_path, checkpoints, embed):
    """tensors[].dtype stays the checkpoint's (what the fingerprint hashes and an outside base
    must have); the embedded copy's dtype is in its payloads.  add-task then needs no --base."""
    from tvswitch.cli import main
    from tvswitch.export.edit import add_task
    from tvswitch.export.exporter import export_bundle

    base, fts = checkpoints
    two = export_bundle(base, {"a": fts["a"], "b": fts["b"]}, str(tmp_path / "two.tvs"), name="tvq", bits=8,
                        include_base=embed)
    assert two.manifest["tensors"]["enc.weight"]["dtype"] == "float32"
    assert two.manifest["tensors"]["half.weight"]["dtype"] == "float16"
    key = two.manifest["base"]["embedded"]["enc.weight"]
    assert two.manifest["payloads"][key]["dtype"] == embed
    CpuRebuilder(two, base)  # the checkpoint itself still passes the fingerprint check
    three = add_task(two.path, "c", fts["c"], out=str(tmp_path / "three.tvs"))
    r = CpuRebuilder(three)  # rebuilds from the embedded base
    out = r.allocate()
    r.rebuild({"c": 1.0}, out)
    for k, v in out.items():
        assert v.dtype == base[k].dtype
        assert np.allclose(v, fts["c"][k], atol=2e-3), k
    from safetensors.numpy import save_file
    save_file(fts["c"], str(tmp_path / "c.safetensors"))
    assert main(["add-task", two.path, "d=%s" % (tmp_path / "c.safetensors"), "-o", str(tmp_path / "four.tvs")]) == 0
    assert Bundle.open(str(tmp_path / "four.tvs")).tasks == ["a", "b", "d"]
