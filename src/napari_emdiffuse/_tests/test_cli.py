import json
import subprocess
import sys

import numpy as np
import pytest
import tifffile

from napari_emdiffuse._tests.standards import imagej_reading, recorded_summary
from napari_emdiffuse.cli import main
from napari_emdiffuse.core.io import read_tiff


@pytest.fixture
def noisy_tif(tmp_path, em_pair):
    path = tmp_path / "noisy.tif"
    tifffile.imwrite(path, em_pair[1], imagej=True, resolution=(1 / 4.0, 1 / 4.0), metadata={"unit": "nm"})
    return path


def test_denoise_writes_output_and_uncertainty_and_json(tmp_path, noisy_tif, tiny_model, capsys):
    out, unc = tmp_path / "out.tif", tmp_path / "unc.tif"
    before = noisy_tif.read_bytes()
    code = main(["denoise", str(noisy_tif), "-o", str(out), "--uncertainty", str(unc), "--model", tiny_model,
                 "--samples", "2", "--steps", "2", "--seed", "3", "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip())
    assert {"uncertainty_score", "threshold", "reliable", "seconds"} <= set(summary)
    result = read_tiff(out)
    assert result.data.dtype == np.uint8 and result.data.shape == (128, 160)
    assert result.scale == pytest.approx((4.0, 4.0)) and result.unit == "nm"
    u = tifffile.imread(unc)
    assert u.dtype == np.float32 and u.shape == (128, 160)
    assert summary["uncertainty_score"] == pytest.approx(float(np.percentile(u, 99)), rel=1e-5)
    assert noisy_tif.read_bytes() == before  # the input file is untouched
    recorded = result.summary  # each file says how it was made
    assert recorded["task"] == "denoise" and recorded["source"] == noisy_tif.name and recorded["seed"] == 3
    assert recorded["uncertainty_score"] == pytest.approx(summary["uncertainty_score"]) and "map" not in recorded
    assert read_tiff(unc).summary["map"] == "uncertainty" and read_tiff(unc).summary["samples"] == 2
    for path in (out, unc):  # what ImageJ/Fiji read from them: the pixel size and the summary (Show Info)
        seen = imagej_reading(path)
        assert seen["imagej"] and seen["pixel"] == pytest.approx((4.0, 4.0)) and seen["unit"] == "nm"
        assert recorded_summary(seen["info"]) == read_tiff(path).summary


@pytest.mark.parametrize("make, message", [
    (lambda p: None, "not found"),
    (lambda p: p.write_bytes(b""), "empty"),
    (lambda p: p.write_text("not an image"), "not a TIFF"),
    (lambda p: tifffile.imwrite(p, np.zeros((20, 20, 3), np.uint8)), "RGB"),
    (lambda p: tifffile.imwrite(p, np.full((9, 9), np.nan, np.float32)), "NaN"),
    (lambda p: tifffile.imwrite(p, np.zeros((2, 3, 4, 9, 9), np.uint8), photometric="minisblack"), "dimensions"),
    (lambda p: p.write_bytes(b"II*\x00" + b"\x00" * 20), "could not be read"),
])
def test_bad_input_gives_one_line_error_and_no_output(tmp_path, tiny_model, capsys, make, message):
    src, out = tmp_path / "in.tif", tmp_path / "out.tif"
    make(src)
    assert main(["denoise", str(src), "-o", str(out), "--model", tiny_model]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_existing_output_needs_overwrite(tmp_path, noisy_tif, tiny_model, capsys):
    out = tmp_path / "out.tif"
    out.write_bytes(b"precious")
    assert main(["denoise", str(noisy_tif), "-o", str(out), "--model", tiny_model]) == 2
    assert out.read_bytes() == b"precious"
    assert main(["denoise", str(noisy_tif), "-o", str(out), "--model", tiny_model, "--steps", "1",
                 "--overwrite"]) == 0
    assert read_tiff(out).data.shape == (128, 160)


def test_a_batch_writes_each_input_into_the_folder_and_goes_on_past_a_bad_one(tmp_path, noisy_tif, tiny_model,
                                                                              capsys):
    second, broken = tmp_path / "second.tif", tmp_path / "broken.tif"
    tifffile.imwrite(second, tifffile.imread(noisy_tif)[:64])
    tifffile.imwrite(broken, np.full((9, 9), np.nan, np.float32))
    out = tmp_path / "restored"
    code = main(["denoise", str(noisy_tif), str(broken), str(second), "-o", str(out), "--uncertainty", str(out),
                 "--model", tiny_model, "--steps", "1", "--json"])
    assert code == 2  # one input failed; the others are done
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines()]
    assert [line["input"] for line in lines] == [str(noisy_tif), str(second)]
    assert lines[1]["output"] == str(out / "second_denoised.tif")
    assert "broken.tif" in captured.err and "NaN" in captured.err
    assert sorted(p.name for p in out.iterdir()) == ["noisy_denoised.tif", "noisy_uncertainty.tif",
                                                     "second_denoised.tif", "second_uncertainty.tif"]
    assert read_tiff(out / "noisy_denoised.tif").scale == pytest.approx((4.0, 4.0))
    assert read_tiff(out / "second_denoised.tif").data.shape == (64, 160)
    same_name = tmp_path / "other" / "noisy.tif"
    same_name.parent.mkdir()
    same_name.write_bytes(noisy_tif.read_bytes())
    assert main(["denoise", str(noisy_tif), str(same_name), "-o", str(out), "--model", tiny_model]) == 2
    assert "same name" in capsys.readouterr().err


def test_models_lists_the_bundled_model(capsys):
    assert main(["models", "--json"]) == 0
    models = json.loads(capsys.readouterr().out)
    assert any(m["task"] == "denoise" and m["bundled"] for m in models)


def test_module_entry_point_runs():
    done = subprocess.run([sys.executable, "-m", "napari_emdiffuse", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and "napari-emdiffuse" in done.stdout


def test_debug_shows_the_traceback_and_unexpected_errors_stay_one_line(tmp_path, tiny_model, monkeypatch, capsys):
    import napari_emdiffuse.core.tasks as tasks

    src = tmp_path / "in.tif"
    tifffile.imwrite(src, np.zeros((16, 16), np.uint8))

    def broken(*args, **kwargs):
        raise ZeroDivisionError("boom")
        yield

    monkeypatch.setattr(tasks, "denoise", broken)
    assert main(["denoise", str(src), "-o", str(tmp_path / "o.tif"), "--model", tiny_model]) == 1
    err = capsys.readouterr().err
    assert "ZeroDivisionError: boom" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    with pytest.raises(ZeroDivisionError):
        main(["--debug", "denoise", str(src), "-o", str(tmp_path / "o.tif"), "--model", tiny_model])
    assert not (tmp_path / "o.tif").exists()


def test_progress_bar_overwrites_its_line_whole_and_gives_each_phase_its_own(capsys):
    from napari_emdiffuse.cli import _progress_bar
    from napari_emdiffuse.core.tasks import Progress

    show = _progress_bar(quiet=False)
    for p in [Progress(0, 1000, "learning from this volume: step 90, loss 0.157"),
              Progress(500, 1000, "learning from this volume: step 290, loss -0.050"),
              Progress(1000, 1000, "learning: done"), Progress(1, 4, "isotropic gap 1/4"), Progress(4, 4, "done")]:
        show(p)
    learning, reconstruction, rest = capsys.readouterr().err.split("\n")
    updates = learning.split("\r")[1:]
    lengths = [len(u) for u in updates]
    assert len(updates) == 3 and lengths == sorted(lengths)  # a shorter message leaves nothing behind
    assert len(reconstruction.split("\r")[1]) < len(updates[0]) and rest == ""


def sstem(path, sections: int = 4, spacing: float = 50.0, pixel: float = 4.0):
    """An anisotropic stack as serial-section TEM gives it: 50 nm sections of 4 nm pixels (R = 12.5)."""
    data = (np.random.default_rng(0).random((sections, 32, 40)) * 200 + 20).astype(np.uint8)
    tifffile.imwrite(path, data, imagej=True, resolution=(1 / pixel, 1 / pixel),
                     metadata={"unit": "nm", "spacing": spacing, "axes": "ZYX"})
    return data


def test_isotropic_any_z_spacing_reports_the_factor_and_keeps_sections_in_place(tmp_path, tiny_isotropic, capsys):
    data = sstem(tmp_path / "sstem.tif")
    fast = ["--model", tiny_isotropic, "--steps", "1", "--samples", "2", "--json"]
    assert main(["isotropic", str(tmp_path / "sstem.tif"), "-o", str(tmp_path / "iso.tif"), *fast]) == 0
    summary = json.loads(capsys.readouterr().out.strip())
    assert summary["factor"] == 12.5 and summary["output_z_spacing"] == pytest.approx(4.0)
    assert summary["section_gap"] == 12.5
    result = read_tiff(tmp_path / "iso.tif")
    assert result.data.shape == (38, 32, 40) and result.scale == pytest.approx((4.0, 4.0, 4.0))
    assert np.array_equal(result.data[[0, 25]], data[[0, 2]])  # sections 0 and 2 fall on the 4 nm grid
    assert result.summary["factor"] == 12.5 and result.summary["output_z_spacing"] == pytest.approx(4.0)
    # a chosen output spacing: 10 nm (R = 5); the model is still told the sections are 12.5 pixels apart
    assert main(["isotropic", str(tmp_path / "sstem.tif"), "-o", str(tmp_path / "s10.tif"), "--output-spacing",
                 "10", *fast]) == 0
    summary = json.loads(capsys.readouterr().out.strip())
    assert (summary["factor"], summary["output_z_spacing"], summary["section_gap"]) == (5, 10, 12.5)
    assert read_tiff(tmp_path / "s10.tif").data.shape == (16, 32, 40)
    # --factor overrides the metadata's ratio (the output spacing follows); bad sections are regenerated
    assert main(["isotropic", str(tmp_path / "sstem.tif"), "-o", str(tmp_path / "f1.tif"), "--factor", "1",
                 "--bad-sections", "1", *fast]) == 0
    summary = json.loads(capsys.readouterr().out.strip())
    assert summary["regenerated"] == "1" and summary["output_z_spacing"] == pytest.approx(50)
    repaired = read_tiff(tmp_path / "f1.tif").data
    assert np.array_equal(repaired[[0, 2, 3]], data[[0, 2, 3]]) and not np.array_equal(repaired[1], data[1])
    # two in a row are 37.5 pixels from their good neighbours: beyond the model, refused with its sentence
    assert main(["isotropic", str(tmp_path / "sstem.tif"), "-o", str(tmp_path / "f2.tif"), "--factor", "1",
                 "--bad-sections", "1-2", *fast]) == 2
    assert "not a slice 0.33 of the way between sections 37.5 pixels apart" in capsys.readouterr().err
    assert not (tmp_path / "f2.tif").exists()


def test_isotropic_aligns_sections_on_request_and_otherwise_says_the_stack_looks_misaligned(tmp_path, tiny_isotropic,
                                                                                             capsys):
    from napari_emdiffuse._tests.test_align import sections, shaken

    stack, _ = shaken(sections(n=6, side=96))
    tifffile.imwrite(tmp_path / "shaken.tif", (stack * 200 + 20).astype(np.uint8), imagej=True,
                     resolution=(1 / 10, 1 / 10), metadata={"unit": "nm", "spacing": 30.0, "axes": "ZYX"})
    fast = ["--model", tiny_isotropic, "--steps", "1", "--samples", "2"]
    assert main(["isotropic", str(tmp_path / "shaken.tif"), "-o", str(tmp_path / "as_is.tif"), *fast]) == 0
    assert "note: The stack looks misaligned" in capsys.readouterr().err
    assert main(["isotropic", str(tmp_path / "shaken.tif"), "-o", str(tmp_path / "aligned.tif"), "--align", *fast,
                 "--json"]) == 0
    captured = capsys.readouterr()
    assert "note: sections aligned first (rigid): moved" in captured.err and "looks misaligned" not in captured.err
    assert read_tiff(tmp_path / "aligned.tif").data.shape == (16, 96, 96)
