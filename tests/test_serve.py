"""histosynth serve: the page's API through Starlette's TestClient, on a tiny finished run built here.

The run: a 3-level U-Net GAN trained 12 steps on two toy slides with two styles (pale, dark), stats
fitted on toy masks, a tiny β-VAE. Painting, sampling on request, uploads through the CLI's readers,
the download's contents, every bad input answered 4xx with one message while the server keeps serving,
and a results folder without a GAN refused.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
import torch

pytest.importorskip("starlette")
pytest.importorskip("multipart")
from starlette.testclient import TestClient  # noqa: E402

from histosynth.cli import OUTPUTS, build_parser, main  # noqa: E402
from histosynth.errors import HistosynthError  # noqa: E402
from histosynth.gan.train import train_gan  # noqa: E402
from histosynth.gan.translate import paint  # noqa: E402
from histosynth.masks.dvae import train_dvae  # noqa: E402
from histosynth.masks.stats import fit_stats  # noqa: E402
from histosynth.models.pix2pix import load_gan  # noqa: E402
from histosynth.serve.app import create_app  # noqa: E402
from histosynth.serve.masks import draw_nuclei  # noqa: E402
from tests.test_dvae import TINY as DVAE_TINY  # noqa: E402
from tests.test_dvae import _write_library  # noqa: E402
from tests.test_stats import write_toy  # noqa: E402
from tests.test_train_gan import _write_set  # noqa: E402

torch.set_num_threads(1)

CLASSES = {1: "Epithelial", 2: "Lymphocyte"}


def make_results(root: Path, *, stats: bool = True, dvae: bool = True) -> Path:
    """A finished run's results folder with tiny models: models/gan/gan.pt (+ checkpoint.pt), stats, β-VAE."""
    (root / "results" / "library").mkdir(parents=True, exist_ok=True)
    data = root / "data"
    sets = [_write_set(data / "a", "slide-a", seed=1), _write_set(data / "b", "slide-b", seed=2)]
    results = root / "results"
    train_gan(sets, results / "models" / "gan", options={"slide-a": "pale", "slide-b": "dark"}, steps=12,
              decay_steps=0, lr=2e-3, checkpoint_every=6, crop=32, depth=3, width=4, batch_size=2, device="cpu",
              threads=1, precision="float32", sample_every=1000, log_every=4, seed=0)
    if stats:
        toy = write_toy(data / "toy", n_patches=16, seed=3, counts={1: (8, 14), 2: (4, 9)}, classes=CLASSES)
        fit_stats([toy], results / "stats", class_names=CLASSES, calibrate=1, calibrate_masks=8, figures=False)
    if dvae:
        lib = _write_library(results / "library" / "nuclei.npz", n=80)
        train_dvae(lib, results / "models" / "dvae", latent_dim=4, epochs=8, device="cpu", threads=1,
                   batch_size=8, min_steps=0, **DVAE_TINY)
    return results


@pytest.fixture(scope="session")
def results(tmp_path_factory) -> Path:
    return make_results(tmp_path_factory.mktemp("serve-run"))


@pytest.fixture(scope="module")
def client(results):
    app = create_app(results, max_upload_mb=1)
    with TestClient(app, raise_server_exceptions=False) as c:
        c.run = app.run
        yield c


def decode(url: str) -> np.ndarray:
    assert url.startswith("data:image/png;base64,")
    img = cv2.imdecode(np.frombuffer(base64.b64decode(url.split(",", 1)[1]), np.uint8), cv2.IMREAD_UNCHANGED)
    return img[..., ::-1] if img.ndim == 3 else img


def two_ellipses() -> list[dict]:
    return [{"kind": "ellipse", "cx": 60, "cy": 70, "rx": 12, "ry": 9, "angle": 20, "type": 1},
            {"kind": "ellipse", "cx": 180, "cy": 150, "rx": 7, "ry": 7, "type": 2}]


def unzip(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return {n: z.read(n) for n in z.namelist()}


def error_of(response) -> str:
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"} and body["error"] and "Traceback" not in body["error"]
    return body["error"]


# --------------------------------------------------------------------------- the page and its info
def test_page_and_assets_are_served_locally(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "/static/app.js" in page.text and "http://" not in page.text and "https://" not in page.text
    for asset in ("app.js", "style.css"):
        r = client.get(f"/static/{asset}")
        assert r.status_code == 200 and "http://" not in r.text and "https://" not in r.text


def test_info_names_the_run_checkpoints_styles_and_classes(client, results):
    info = client.get("/api/info").json()
    assert info["run"] == str(results)
    names = [c["name"] for c in info["checkpoints"]]
    assert names == ["gan/gan.pt", "gan/checkpoint.pt"] and info["default"] == "gan/gan.pt"
    first = info["checkpoints"][0]
    assert first["styles"] == ["dark", "pale"] and first["step"] == 12 and first["generator"] == "unet"
    assert first["sides"] == [256, 512]
    assert info["classes"] == {"1": "Epithelial", "2": "Lymphocyte"}
    assert info["sampling"] is True and info["shape_source"] == "dvae" and info["shapes_from"] == "β-VAE"
    assert 0 < len(info["shapes"]) <= 12 and decode(info["shapes"][0]).shape == (64, 64)


# --------------------------------------------------------------------------- paint
def test_paint_draws_the_mask_and_paints_it_with_translates_function(client, results):
    r = client.post("/api/paint", json={"side": 256, "nuclei": two_ellipses(), "style": "pale", "seed": 3})
    assert r.status_code == 200, r.text
    assert float(r.headers["Server-Timing"].split("paint;dur=")[1]) > 0  # what benchmarks/serve.py reads
    out = r.json()
    assert out["n_nuclei"] == 2 and out["style"] == "pale" and out["step"] == 12
    assert out["checkpoint"] == "gan/gan.pt" and out["run"] == str(results) and out["generator"] == "unet"
    image = decode(out["image"])
    assert image.shape == (256, 256, 3)
    assert decode(out["mask"]).shape == decode(out["overlay"]).shape == (256, 256, 3)
    mask = client.run.mask(out["mask_id"])
    assert mask.inst[70, 60] == 1 and mask.types[70, 60] == 1
    assert mask.inst[150, 180] == 2 and mask.types[150, 180] == 2
    assert mask.inst[0, 0] == 0 and set(np.unique(mask.inst)) == {0, 1, 2}
    # the same pixels as translate's painting step, called directly on the same generator
    bundle = load_gan(results / "models" / "gan" / "gan.pt")
    direct = paint(bundle, mask.inst[None], mask.types[None], [bundle.options.index("pale")], seed=3)[0]
    assert np.array_equal(image, direct)


def test_style_and_checkpoint_change_the_image(client):
    body = {"side": 256, "nuclei": two_ellipses(), "seed": 0}
    pale = decode(client.post("/api/paint", json={**body, "style": "pale"}).json()["image"])
    dark = decode(client.post("/api/paint", json={**body, "style": "dark"}).json()["image"])
    again = decode(client.post("/api/paint", json={**body, "style": "pale"}).json()["image"])
    assert np.array_equal(pale, again) and not np.array_equal(pale, dark)
    other = client.post("/api/paint", json={**body, "style": "pale", "checkpoint": "gan/checkpoint.pt"}).json()
    assert other["checkpoint"] == "gan/checkpoint.pt" and other["step"] == 12


def test_drawing_over_a_base_keeps_it_and_shapes_are_placed(client):
    first = client.post("/api/paint", json={"side": 256, "nuclei": two_ellipses()}).json()
    shape = {"kind": "shape", "shape": 0, "cx": 128, "cy": 40, "r": 8, "angle": 30, "type": 2}
    second = client.post("/api/paint", json={"side": 256, "base": first["mask_id"], "nuclei": [shape]}).json()
    assert second["n_nuclei"] == 3
    mask = client.run.mask(second["mask_id"])
    assert mask.inst[40, 128] == 3 and mask.types[40, 128] == 2 and mask.inst[70, 60] == 1


def test_draw_nuclei_newest_on_top_and_ids_renumbered():
    shapes = np.zeros((1, 64, 64), bool)
    inst, types = draw_nuclei([{"kind": "ellipse", "cx": 20, "cy": 20, "rx": 5, "ry": 5, "type": 1},
                               {"kind": "ellipse", "cx": 20, "cy": 20, "rx": 9, "ry": 9, "type": 2},
                               {"kind": "ellipse", "cx": 50, "cy": 50, "rx": 4, "ry": 4, "type": 1}],
                              64, CLASSES, shapes)
    assert set(np.unique(inst)) == {0, 1, 2}  # the first, covered entirely, is gone
    assert inst[20, 20] == 1 and types[20, 20] == 2 and inst[50, 50] == 2 and types[50, 50] == 1


# --------------------------------------------------------------------------- sample
def test_sample_with_type_mix_and_density(client):
    def sampled(**kw):
        r = client.post("/api/sample", json={"side": 256, "seed": 1, **kw})
        assert r.status_code == 200, r.text
        return client.run.mask(r.json()["mask_id"])

    base = [sampled(seed=s) for s in range(3)]
    dense = [sampled(seed=s, density=2.5) for s in range(3)]
    assert sum(m.n_nuclei for m in dense) > 1.5 * sum(m.n_nuclei for m in base)
    lymph = [sampled(seed=s, type_mix={"Lymphocyte": 1.0}) for s in range(2)]
    for m in lymph:
        assert m.n_nuclei > 0 and set(np.unique(m.types[m.inst > 0])) == {2}
    painted = client.post("/api/paint", json={"side": 256, "base": client.post(
        "/api/sample", json={"side": 256, "seed": 5}).json()["mask_id"]}).json()
    assert painted["origin"].startswith("sampled (statistical, seed 5")


# --------------------------------------------------------------------------- upload
def png(arr: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", arr)
    assert ok
    return buf.tobytes()


def test_upload_a_label_png_with_and_without_types(client):
    inst = np.zeros((256, 256), np.uint16)
    cv2.circle(inst, (50, 60), 10, 1, -1)
    cv2.circle(inst, (200, 100), 8, 2, -1)
    types = np.zeros((256, 256), np.uint8)
    types[inst == 1], types[inst == 2] = 2, 1
    r = client.post("/api/upload", data={"side": "256", "type": "1"},
                    files={"file": ("cells.png", png(inst), "image/png"), "types": ("cells_type.png", png(types))})
    assert r.status_code == 200, r.text
    mask = client.run.mask(r.json()["mask_id"])
    assert mask.n_nuclei == 2 and mask.types[60, 50] == 2 and mask.types[100, 200] == 1
    assert abs(int((mask.inst > 0).sum()) - int((inst > 0).sum())) < 0.05 * (inst > 0).sum()
    r = client.post("/api/upload", data={"side": "256", "type": "2"}, files={"file": ("cells.png", png(inst))})
    mask = client.run.mask(r.json()["mask_id"])
    assert mask.n_nuclei == 2 and set(np.unique(mask.types[mask.inst > 0])) == {2}


def test_upload_geojson_and_the_download_round_trips(client, tmp_path):
    drawn = client.post("/api/paint", json={"side": 256, "nuclei": two_ellipses(), "style": "dark", "seed": 2}).json()
    r = client.get("/api/download", params={"mask": drawn["mask_id"], "style": "dark", "seed": 2})
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    files = unzip(r.content)
    assert set(files) == {"image.png", "inst.tif", "types.tif", "nuclei.geojson", "info.json"}
    mask = client.run.mask(drawn["mask_id"])
    assert np.array_equal(tifffile.imread(io.BytesIO(files["inst.tif"])), mask.inst)
    assert np.array_equal(tifffile.imread(io.BytesIO(files["types.tif"])), mask.types)
    image = cv2.imdecode(np.frombuffer(files["image.png"], np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
    assert np.array_equal(image, decode(drawn["image"]))
    info = json.loads(files["info.json"])
    assert info["style"] == "dark" and info["step"] == 12 and info["n_nuclei"] == 2
    features = json.loads(files["nuclei.geojson"])["features"]
    assert sorted(f["properties"]["classification"]["name"] for f in features) == ["Epithelial", "Lymphocyte"]
    # the GeoJSON goes back in through the upload: the same nuclei, the same types
    back = client.post("/api/upload", data={"side": "256"},
                       files={"file": ("nuclei.geojson", files["nuclei.geojson"], "application/geo+json")})
    assert back.status_code == 200, back.text
    again = client.run.mask(back.json()["mask_id"])
    assert np.array_equal(again.types, mask.types)
    assert (again.inst > 0).sum() == (mask.inst > 0).sum()


# --------------------------------------------------------------------------- bad input
def geojson(name: str) -> bytes:
    ring = [[10, 10], [30, 10], [30, 30], [10, 30], [10, 10]]
    return json.dumps({"type": "FeatureCollection", "features": [{
        "type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
        "properties": {"classification": {"name": name}}}]}).encode()


BAD = [
    ("non-image upload", lambda c: c.post("/api/upload", data={"side": "256"},
                                          files={"file": ("notes.png", b"this is not an image at all")}),
     "cannot read label image"),
    ("wrong size", lambda c: c.post("/api/upload", data={"side": "256"},
                                    files={"file": ("small.png", png(np.ones((100, 120), np.uint8)))}),
     "120 x 100"),
    ("wrong mode", lambda c: c.post("/api/upload", data={"side": "256"}, files={"file": (
        "colour.png", png(np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)))}),
     "colour image"),
    ("unknown class", lambda c: c.post("/api/upload", data={"side": "256"},
                                       files={"file": ("x.geojson", geojson("Neutrophil"))}), "unknown class"),
    ("unknown style", lambda c: c.post("/api/paint", json={"side": 256, "style": "purple"}), "unknown style"),
    ("unknown checkpoint", lambda c: c.post("/api/paint", json={"checkpoint": "gan/other.pt"}), "unknown generator"),
    ("unknown type drawn", lambda c: c.post("/api/paint", json={"nuclei": [
        {"kind": "ellipse", "cx": 5, "cy": 5, "rx": 3, "ry": 3, "type": 9}]}), "unknown type 9"),
    ("bad side", lambda c: c.post("/api/paint", json={"side": 100}), "side 100"),
    ("not json", lambda c: c.post("/api/paint", content=b"{oops", headers={"content-type": "application/json"}),
     "not JSON"),
    ("bad density", lambda c: c.post("/api/sample", json={"density": "lots"}), "density"),
    ("bad type mix", lambda c: c.post("/api/sample", json={"type_mix": {"Neutrophil": 0.5}}), "Neutrophil"),
    ("unknown mask", lambda c: c.get("/api/download", params={"mask": "m999999"}), "unknown mask"),
    ("too large", lambda c: c.post("/api/upload", data={"side": "256"},
                                   files={"file": ("big.png", b"\0" * (2 * 2**20))}), "limit of 1 MB"),
    ("no file", lambda c: c.post("/api/upload", data={"side": "256"}), "no file"),
]


@pytest.mark.parametrize("what, request_, message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_4xx_with_one_message_and_the_server_keeps_serving(client, what, request_, message):
    r = request_(client)
    assert message in error_of(r), (what, r.json())
    if what == "too large":
        assert r.status_code == 413
    ok = client.post("/api/paint", json={"side": 256, "nuclei": two_ellipses()})
    assert ok.status_code == 200


def test_a_results_folder_without_a_gan_is_refused(results, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(results / "stats", bare / "stats")
    with pytest.raises(HistosynthError, match="no GAN in this results folder"):
        create_app(bare)
    assert main(["serve", str(bare), "--port", "8765"]) == 2


def test_a_run_without_stats_paints_but_does_not_sample(results, tmp_path):
    part = tmp_path / "part"
    shutil.copytree(results / "models" / "gan", part / "models" / "gan")
    with TestClient(create_app(part)) as c:
        info = c.get("/api/info").json()
        assert info["sampling"] is False and info["shapes"] == []
        assert c.post("/api/paint", json={"nuclei": two_ellipses()}).status_code == 200
        assert "no fitted statistics" in error_of(c.post("/api/sample", json={}))


def test_cli_serve_arguments_and_output_table():
    args = build_parser().parse_args(["serve", "res"])
    assert (args.host, args.port, args.threads, args.max_upload_mb) == ("127.0.0.1", 8000, 2, 10.0)
    assert OUTPUTS["serve"] is None
    assert main(["serve", "res", "--port", "0"]) == 2


def test_cli_names_the_extra_when_the_server_packages_are_missing(monkeypatch, capsys):
    from histosynth.cli import serve as cli_serve

    monkeypatch.setattr(cli_serve, "NEEDS", ("starlette", "no_such_module_histosynth"))
    assert main(["serve", "res"]) == 2
    assert "histosynth[serve]" in capsys.readouterr().err



def test_overlay_and_mask_picture_are_made_once_per_mask_and_match_the_export_outlines():
    from histosynth.patches.export import outline_image
    from histosynth.serve.masks import mask_picture_url, overlay_picture
    from histosynth.serve.run import Mask

    inst = np.zeros((32, 32), np.int32)
    inst[4:12, 4:12], inst[14:30, 10:20], inst[20:24, 24:28] = 1, 2, 3
    types = np.where(inst == 3, 0, np.minimum(inst, 2)).astype(np.uint8)  # nucleus 3 untyped
    mask = Mask(inst, types, "drawn")
    rng = np.random.default_rng(0)
    for _ in range(2):  # the second paint of the same mask takes the cached outline
        image = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
        assert np.array_equal(overlay_picture(image, mask), outline_image(image, inst, types))
    assert mask_picture_url(mask) is mask_picture_url(mask) and "outline" in mask.pictures
