"""What LiverSAM does where it may not write: read-only output folders, a write-protected output file, a read-only
LIVERSAM_HOME / encoder cache, a token file, a training run's folders. Each case runs the command line as a user
would (``python -m liversam ...`` in a subprocess), with file permissions in force: as root (CI, this machine) through
``setpriv`` without the capabilities that override them (:func:`without_permission_override`); the tests fail, never
skip, when that cannot be arranged. Everything is refused before any slow work, with one message naming the path and
what to do (exit 2, no traceback), or works without the optional cache and says so.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import REPO_ROOT

#: Capabilities that let root ignore file permissions: write anywhere, read / search anywhere, act as any file's owner.
OVERRIDE_CAPABILITIES = ("dac_override", "dac_read_search", "fowner")

EXAMPLE = REPO_ROOT / "examples" / "lits117"


def without_permission_override(command: list[str]) -> list[str]:
    """``command`` such that file permissions apply to it: unchanged for a user other than root; for root, run
    through util-linux's ``setpriv`` with :data:`OVERRIDE_CAPABILITIES` dropped from its bounding set (so neither the
    command nor anything it starts has them). Fails the test when root has no ``setpriv``."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return command
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.fail("these tests run as root and need 'setpriv' (util-linux: apt-get install util-linux) to run "
                    "commands without the capabilities that bypass file permissions")  # fmt: skip
    return [setpriv, "--bounding-set=" + ",".join(f"-{c}" for c in OVERRIDE_CAPABILITIES), *command]


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ, LIVERSAM_HOME=str(home), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    env["PYTHONPATH"] = str(REPO_ROOT / "LiverSAM") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def liversam(args: list[str], home: Path, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    """``python -m liversam ARGS`` from the repository root, permissions in force; LIVERSAM_HOME=home."""
    command = without_permission_override([sys.executable, "-m", "liversam", *args])
    return subprocess.run(command, cwd=REPO_ROOT, env=_env(home, **env), capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def read_only_folder(path: Path, mode: int = 0o555) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(mode)
    return path


@pytest.fixture(autouse=True)
def _writable_again(tmp_path):
    """pytest removes tmp_path later; give every folder its write and search permission back first."""
    yield
    for root, dirs, _files in os.walk(tmp_path):
        for name in dirs:
            os.chmod(Path(root) / name, 0o755)


@pytest.fixture(scope="module", autouse=True)
def permissions_apply(tmp_path_factory):
    """The premise of every test here: a command run by :func:`without_permission_override` cannot write into a
    read-only folder. Fails (does not skip) when it can: the tests would then prove nothing."""
    folder = read_only_folder(tmp_path_factory.mktemp("premise") / "ro", 0o500)
    probe = folder / "x"
    command = without_permission_override([sys.executable, "-c", f"open({str(probe)!r}, 'w')"])
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    finally:
        folder.chmod(0o755)
    if done.returncode == 0 or probe.exists():
        pytest.fail(f"'{' '.join(command)}' wrote into a read-only folder: file permissions are not in force for "
                    "these tests (a root whose capabilities setpriv cannot drop?)")  # fmt: skip
    assert "Permission denied" in done.stderr, done.stderr


def _readme_segment(output: Path, report: Path, lesions: Path) -> list[str]:
    """The README's command line (examples/lits117, run from the repository root), its out/ folder replaced."""
    return ["segment", "examples/lits117/ct.nii.gz", "--prompts", "examples/lits117/prompts.json",
            "--output", str(output), "--report", str(report), "--lesions", str(lesions)]  # fmt: skip


def _assert_refused_at_once(done: subprocess.CompletedProcess, started: float, *says: str) -> None:
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr and "internal error" not in done.stderr, done.stderr
    for text in says:
        assert text in done.stderr, (text, done.stderr)
    assert "[liversam]" not in done.stderr, done.stderr  # no stage started: refused before the work
    assert time.perf_counter() - started < 30, "refused only after work (a refusal takes ~2 s)"


def _tiny_case(folder: Path) -> tuple[Path, Path]:
    """A 48 x 40 x 3 synthetic CT with one box: what does not depend on real data runs in seconds."""
    folder.mkdir(parents=True, exist_ok=True)
    array = np.full((3, 40, 48), -1000, dtype=np.int16)
    array[:, 10:30, 12:36] = 60
    ct = folder / "ct.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(array), str(ct))
    prompts = folder / "prompts.json"
    prompts.write_text(json.dumps({"coordinate_system": "IJK", "segments": [
        {"name": "liver", "boxes": [[[12, 10, 1], [35, 29, 1]]]}]}))  # fmt: skip
    return ct, prompts


# --- liversam segment: the README command line ------------------------------------------------------------------


@pytest.mark.parametrize("option", ["--output", "--report", "--lesions"])
def test_readme_segment_into_a_read_only_folder_is_refused_at_once_naming_the_path(tmp_path, option):
    out, ro = tmp_path / "out", read_only_folder(tmp_path / "ro")
    paths = {"--output": out / "lits117.seg.nrrd", "--report": out / "review.json", "--lesions": out / "lesions.csv"}
    paths[option] = ro / paths[option].name
    started = time.perf_counter()
    done = liversam(_readme_segment(paths["--output"], paths["--report"], paths["--lesions"]), tmp_path / "home")
    _assert_refused_at_once(done, started, f"{option} '{paths[option]}'", f"cannot write into the folder '{ro}'",
                            "Permission denied", "choose a folder you can write to")  # fmt: skip
    assert not out.exists() and os.listdir(ro) == []  # nothing written, not even half a file


def test_readme_segment_into_a_folder_it_may_not_search_is_refused_not_an_internal_error(tmp_path):
    """A folder with read and write but no search ('x') permission: Path.is_dir raised PermissionError there, and the
    output check ended in 'internal error' (exit 3) instead of naming the folder."""
    hidden = read_only_folder(tmp_path / "noexec", 0o600)
    out = tmp_path / "out"
    started = time.perf_counter()
    done = liversam(_readme_segment(hidden / "lits117.seg.nrrd", out / "review.json", out / "lesions.csv"),
                    tmp_path / "home")  # fmt: skip
    _assert_refused_at_once(done, started, f"--output '{hidden / 'lits117.seg.nrrd'}'",
                            f"cannot write into the folder '{hidden}'")  # fmt: skip


def test_readme_segment_does_not_replace_a_write_protected_output_file(tmp_path):
    """An existing output the user made read-only (chmod a-w) in a folder they can write: the atomic write's rename
    needs only the folder's permission, so it was silently replaced. It is refused as a plain write would be."""
    out = tmp_path / "out"
    out.mkdir()
    protected = out / "lits117.seg.nrrd"
    protected.write_text("an earlier result")
    protected.chmod(0o444)
    started = time.perf_counter()
    done = liversam(_readme_segment(protected, out / "review.json", out / "lesions.csv"), tmp_path / "home")
    _assert_refused_at_once(done, started, f"--output '{protected}' exists and is write-protected",
                            f"chmod u+w '{protected}'", "delete it, or choose another output path")  # fmt: skip
    assert protected.read_text() == "an earlier result" and stat.S_IMODE(protected.stat().st_mode) == 0o444
    assert sorted(p.name for p in out.iterdir()) == ["lits117.seg.nrrd"]


def test_export_refuses_a_write_protected_output_and_replaces_it_once_writable(tmp_path):
    label = np.zeros((3, 40, 48), dtype=np.uint8)
    label[1, 10:30, 12:36] = 1
    source = tmp_path / "label.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(label), str(source))
    target = tmp_path / "labels.nii.gz"
    target.write_text("old")
    target.chmod(0o444)
    done = liversam(["export", str(source), "--output", str(target)], tmp_path / "home")
    assert done.returncode == 2 and f"--output '{target}' exists and is write-protected" in done.stderr, done.stderr
    assert target.read_text() == "old"
    target.chmod(0o644)  # the rule is the permission, not that the file exists: outputs are replaced as before
    done = liversam(["export", str(source), "--output", str(target)], tmp_path / "home")
    assert done.returncode == 0, done.stderr
    assert int(sitk.GetArrayFromImage(sitk.ReadImage(str(target))).sum()) == 20 * 24


#: Another user's and group's id (``nobody``), who owns the files of the sticky-folder tests.
OTHER_UID = 65534


def _sticky_folder_with_anothers_file(folder: Path, name: str) -> Path:
    """``folder`` made like /tmp (mode 1777) but owned by another user, holding that user's file ``name``: writable by
    everyone (mode 0666), so only the sticky rule stands in the way. Needs root (os.chown)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("making another user's file needs root (os.chown); run as root as CI does")
    folder.mkdir(parents=True)
    theirs = folder / name
    theirs.write_text("another user's file")
    theirs.chmod(0o666)
    os.chown(theirs, OTHER_UID, OTHER_UID)
    os.chown(folder, OTHER_UID, OTHER_UID)
    folder.chmod(0o1777)
    return theirs


@pytest.mark.parametrize("command", ["export", "segment"])
def test_anothers_output_file_in_a_sticky_folder_is_refused_at_once(tmp_path, command):
    """An existing output of another user in a sticky folder such as /tmp: the folder and the file are writable, so it
    passed the start check, and the atomic rename failed only at the end ('Operation not permitted') after all the
    work. Refused at the start, naming the file, its owner, the sticky folder and what to do; nothing is written."""
    theirs = _sticky_folder_with_anothers_file(tmp_path / "shared", "result.nii.gz")
    ct, prompts = _tiny_case(tmp_path / "case")
    args = {
        "export": ["export", str(EXAMPLE / "label.nii.gz"), "--output", str(theirs)],
        "segment": ["segment", str(ct), "--prompts", str(prompts), "--output", str(theirs)],
    }[command]
    started = time.perf_counter()
    done = liversam(args, tmp_path / "home", timeout=300)
    _assert_refused_at_once(done, started, f"--output '{theirs}' exists and belongs to user 'nobody' (uid {OTHER_UID})",
                            f"in the sticky folder '{theirs.parent}' (mode drwxrwxrwt",
                            "Choose another output name, or have its owner delete it first.")  # fmt: skip
    assert os.listdir(theirs.parent) == ["result.nii.gz"] and theirs.read_text() == "another user's file"


def test_anothers_file_in_a_sticky_folder_may_be_replaced_by_root_or_in_ones_own_folder(tmp_path, monkeypatch):
    """The rule is the system's: root (CAP_FOWNER, as this test process runs) replaces it, and so does the folder's
    owner; without the capability and owning neither, it is refused."""
    from liversam import output_paths
    from liversam.errors import OutputError

    theirs = _sticky_folder_with_anothers_file(tmp_path / "shared", "result.json")
    output_paths.check_outputs({"--output": theirs}, [])  # root with CAP_FOWNER: as the kernel allows
    monkeypatch.setattr(output_paths, "_overrides_file_ownership", lambda: False)
    with pytest.raises(OutputError, match="sticky folder"):
        output_paths.check_outputs({"--output": theirs}, [])
    os.chown(theirs.parent, 0, 0)  # the folder's owner may replace any entry in it
    output_paths.check_outputs({"--output": theirs}, [])
    os.chown(theirs.parent, OTHER_UID, OTHER_UID)
    theirs.parent.chmod(0o777)  # not sticky: the rename needs only the folder's permission
    output_paths.check_outputs({"--output": theirs}, [])


def test_anothers_write_protected_output_is_not_answered_with_chmod(tmp_path):
    """Another user's read-only output (mode 0644, in a folder this user can write): refused as before, but the advice
    was 'chmod u+w', which only its owner may do. The message names the owner instead."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("making another user's file needs root (os.chown); run as root as CI does")
    theirs = tmp_path / "result.nii.gz"
    theirs.write_text("another user's file")
    theirs.chmod(0o644)
    os.chown(theirs, OTHER_UID, OTHER_UID)
    started = time.perf_counter()
    done = liversam(["export", str(EXAMPLE / "label.nii.gz"), "--output", str(theirs)], tmp_path / "home")
    _assert_refused_at_once(done, started, f"--output '{theirs}' exists and is write-protected (mode -rw-r--r--)",
                            f"It belongs to user 'nobody' (uid {OTHER_UID}): choose another output path")  # fmt: skip
    assert "chmod" not in done.stderr and theirs.read_text() == "another user's file"


def _system_tmp(tmp_path: Path, fallback_mode: int | None = None) -> Path:
    """A system temporary folder for one command (TMPDIR): the encoder cache's fallback goes there, not into the
    machine's /tmp. ``fallback_mode``: make the fallback folder first with this mode (0o777: it is refused)."""
    system_tmp = tmp_path / "tmp"
    system_tmp.mkdir()
    if fallback_mode is not None:
        fallback = system_tmp / f"liversam-cache-{os.geteuid()}"
        fallback.mkdir()
        fallback.chmod(fallback_mode)
    return system_tmp


@pytest.fixture(scope="module")
def one_slice_check_set(tmp_path_factory) -> Path:
    """The mask-agreement check's data (``LIVERSAM_AGREEMENT_DATA``) with one of its six slices: the example CT and
    its label on lits117 slice 30 alone (a liver and a tumour box), as test_acceleration.py checks on one slice. A
    check runs the plain and the candidate encoder on each slice, single-threaded here (OMP_NUM_THREADS=1): about
    3.5 s an encode, 40 s a run with all six; where its verdict goes does not depend on how many slices it has."""
    folder = tmp_path_factory.mktemp("check_set")
    (folder / "ct.nii.gz").symlink_to(EXAMPLE / "ct.nii.gz")
    label = sitk.ReadImage(str(EXAMPLE / "label.nii.gz"))
    array = sitk.GetArrayFromImage(label)
    array[np.arange(array.shape[0]) != 30] = 0
    one_slice = sitk.GetImageFromArray(array)
    one_slice.CopyInformation(label)
    sitk.WriteImage(one_slice, str(folder / "label.nii.gz"))
    return folder


def test_segment_with_a_read_only_liversam_home_and_encoder_cache_works_and_says_where_to_cache(
    tmp_path, one_slice_check_set
):
    """Caches are optional. With LIVERSAM_HOME and the encoder cache read-only and empty, and no usable fallback (the
    one in the temporary folder is writable by others), the CT is still segmented; one warning names the cache
    folder, why the fallback cannot be used, the cost and LIVERSAM_CACHE_DIR. Before session 38, the fused PyTorch
    encoder was lost too (its check could not store its reference masks)."""
    ct, prompts = _tiny_case(tmp_path / "case")
    home, cache = read_only_folder(tmp_path / "home"), read_only_folder(tmp_path / "cache")
    system_tmp = _system_tmp(tmp_path, fallback_mode=0o777)
    output = tmp_path / "out" / "ct.seg.nrrd"
    done = liversam(["segment", str(ct), "--prompts", str(prompts), "--output", str(output)], home,
                    timeout=300, LIVERSAM_CACHE_DIR=str(cache), TMPDIR=str(system_tmp),
                    LIVERSAM_AGREEMENT_DATA=str(one_slice_check_set))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert output.is_file() and "Traceback" not in done.stderr
    warning = next((line for line in done.stderr.splitlines() if line.startswith("WARNING") and "cache" in line), "")
    assert f"The encoder cache folder '{cache / 'encoders'}' cannot be written" in warning, done.stderr
    fallback = system_tmp / f"liversam-cache-{os.geteuid()}"
    assert f"nor can its fallback '{fallback / 'encoders'}' be used ('{fallback}' can be written by other users" in warning
    assert "Set LIVERSAM_CACHE_DIR to a folder you can write to" in warning and "slower" in warning
    assert "encoder torch fp32" in done.stdout, done.stdout  # the fused encoder kept: its check needs no cache
    assert "2 masks)" in done.stdout, done.stdout  # checked now (on the one-slice check set), not skipped
    assert os.listdir(home) == [] and os.listdir(cache) == [] and os.listdir(fallback) == []


def test_segment_with_a_read_only_encoder_cache_keeps_the_check_verdict_in_a_private_fallback(
    tmp_path, one_slice_check_set
):
    """A read-only encoder cache: before, the mask check's verdict could not be stored (each run checked again) and
    OpenVINO could not be exported. Now they go to <temporary folder>/liversam-cache-<uid> (mode 0700), and one
    warning names both folders. (--accelerate torch: the fallback's use without a minute of OpenVINO export.)"""
    ct, prompts = _tiny_case(tmp_path / "case")
    cache = read_only_folder(tmp_path / "cache")
    system_tmp = _system_tmp(tmp_path)
    output = tmp_path / "out" / "ct.seg.nrrd"
    done = liversam(["segment", str(ct), "--prompts", str(prompts), "--output", str(output), "--accelerate", "torch"],
                    tmp_path / "home", timeout=300, LIVERSAM_CACHE_DIR=str(cache), TMPDIR=str(system_tmp),
                    LIVERSAM_AGREEMENT_DATA=str(one_slice_check_set))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert output.is_file() and "Traceback" not in done.stderr and "encoder torch fp32" in done.stdout, done.stdout
    fallback = system_tmp / f"liversam-cache-{os.geteuid()}"
    warnings = [line for line in done.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1, done.stderr
    assert f"The encoder cache folder '{cache / 'encoders'}' cannot be written" in warnings[0]
    assert f"are kept in '{fallback / 'encoders'}' instead" in warnings[0]
    assert stat.S_IMODE(fallback.stat().st_mode) == 0o700 and os.listdir(cache) == []
    verdicts = list((fallback / "encoders" / "agreement").glob("*-torch+plain-fp32-*.json"))
    assert len(verdicts) == 1, verdicts
    verdict = json.loads(verdicts[0].read_text())
    assert verdict["accepted"] is True and len(verdict["dice"]) == 2, verdict  # slice 30's liver and tumour


# --- liversam serve ----------------------------------------------------------------------------------------------


def test_serve_refuses_a_token_file_in_a_read_only_folder_at_once(tmp_path):
    ro = read_only_folder(tmp_path / "ro")
    done = liversam(["serve", "--token-file", str(ro / "token")], tmp_path / "home", timeout=60)
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert f"--token-file '{ro / 'token'}': cannot write into the folder '{ro}'" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and "internal error" not in done.stderr
    assert "listening" not in done.stdout


def test_serve_with_a_read_only_liversam_home_starts_and_prints_the_token_it_cannot_save(tmp_path):
    """Without --token-file the token goes to $LIVERSAM_HOME/server-token; that failing ended the server with an
    internal error. The token is printed anyway, so the server starts, says it could not save it and where to."""
    home = read_only_folder(tmp_path / "home")
    command = without_permission_override([sys.executable, "-m", "liversam", "serve"])
    env = _env(home, LIVERSAM_CACHE_DIR=str(read_only_folder(tmp_path / "cache")))
    server = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)  # fmt: skip
    try:
        listening = server.stdout.readline()
        token_line = server.stdout.readline()
        assert listening.startswith("liversam serve: listening on http://127.0.0.1:"), (listening, server.poll())
        url = listening.split("listening on ")[1].strip()
        assert f"(not saved: '{home / 'server-token'}' cannot be written)" in token_line, token_line
        token = token_line.split("token ")[1].split()[0]
        request = urllib.request.Request(f"{url}/v1/models", headers={"Authorization": f"Bearer {token}"})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no proxy for 127.0.0.1
        deadline = time.monotonic() + 60
        while True:  # the port is bound before it is printed; uvicorn accepts a moment later
            try:
                with opener.open(request, timeout=30) as response:  # the token works; the registry is read
                    assert response.status == 200 and "litemedsam" in response.read().decode()
                break
            except urllib.error.URLError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.2)
    finally:
        server.terminate()
        _out, err = server.communicate(timeout=30)
    assert "Set LIVERSAM_HOME to a folder you can write to, or pass --token-file FILE" in err, err
    assert "Traceback" not in err and os.listdir(home) == []


# --- liversam train ----------------------------------------------------------------------------------------------


def _train(data: Path, out: Path, home: Path, *extra: str) -> tuple[subprocess.CompletedProcess, float]:
    started = time.perf_counter()
    args = ["train", "--data", str(data), "--out", str(out), "--epochs", "1", "--max-slices", "4", "--device", "cpu",
            "--threads", "1", "--no-progress", *extra]  # fmt: skip
    return liversam(args, home, timeout=300), started


def test_train_into_a_read_only_folder_is_refused_before_any_encoding(tmp_path, data_dir):
    ro = read_only_folder(tmp_path / "ro")
    done, started = _train(data_dir / "lits117", ro / "run", tmp_path / "home")
    _assert_refused_at_once(done, started, f"'{ro / 'run' / 'config.json'}'", f"cannot write into the folder '{ro}'")
    assert os.listdir(ro) == []


def test_train_with_a_write_protected_lock_file_left_in_the_run_folder_is_refused_at_once(tmp_path, data_dir):
    """A train.lock left by a finished run of another user (or read-only): the lock could not be opened for writing
    and the run stopped with an internal error (exit 3). Refused at once, naming the file."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "train.lock").write_text("1234\n")
    (run / "train.lock").chmod(0o444)
    done, started = _train(data_dir / "lits117", run, tmp_path / "home")
    _assert_refused_at_once(done, started, f"'{run / 'train.lock'}' exists and is write-protected")


def test_train_with_a_read_only_cache_dir_is_refused_before_any_encoding(tmp_path, data_dir):
    """--cache-dir in a read-only folder ended in an internal error (exit 3) after the model was loaded."""
    ro = read_only_folder(tmp_path / "ro")
    done, started = _train(data_dir / "lits117", tmp_path / "run", tmp_path / "home", "--cache-dir", str(ro / "c"))
    _assert_refused_at_once(done, started, f"--cache-dir '{ro / 'c'}': cannot write into the folder '{ro}'")
    assert not (tmp_path / "run").exists()


def test_train_with_a_read_only_model_registry_is_refused_before_any_encoding(tmp_path, data_dir):
    """The best model is registered in $LIVERSAM_HOME/models when the run ends: a read-only LIVERSAM_HOME trained the
    whole run and then stopped with an internal error. Refused at once, saying LIVERSAM_HOME or --no-register."""
    home = read_only_folder(tmp_path / "home")
    done, started = _train(data_dir / "lits117", tmp_path / "run", home)
    _assert_refused_at_once(done, started, f"The model registry folder '{home / 'models'}' cannot be written",
                            "Set LIVERSAM_HOME to a folder you can write to, or pass --no-register")  # fmt: skip
    assert not (tmp_path / "run").exists()


# --- liversam evaluate, export, benchmark ---------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["evaluate", "evaluate --markdown", "export", "benchmark"])
def test_other_commands_refuse_an_output_in_a_read_only_folder_at_once(tmp_path, data_dir, command):
    """benchmark measured for minutes and then failed to write --output (an internal error)."""
    ro = read_only_folder(tmp_path / "ro")
    target = ro / ("result.md" if "markdown" in command else "result.nii.gz" if command == "export" else "result.json")
    args = {
        "evaluate": ["evaluate", "--data", str(data_dir / "lits117"), "--output", str(target)],
        "evaluate --markdown": ["evaluate", "--data", str(data_dir / "lits117"), "--output",
                                str(tmp_path / "r.json"), "--markdown", str(target)],
        "export": ["export", str(EXAMPLE / "label.nii.gz"), "--output", str(target)],
        "benchmark": ["benchmark", "--output", str(target)],
    }[command]  # fmt: skip
    started = time.perf_counter()
    try:
        done = liversam(args, tmp_path / "home", timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"liversam {command} was still working after 60 s instead of refusing '{target}' at once")
    option = "--markdown" if "markdown" in command else "--output"
    _assert_refused_at_once(done, started, f"{option} '{target}': cannot write into the folder '{ro}'")
    assert os.listdir(ro) == [] and not (tmp_path / "r.json").exists()


def test_a_report_that_cannot_be_written_after_the_run_is_a_message_not_an_internal_error(tmp_path):
    """The report and lesion table are checked writable first; should the folder change (or the disk fill) by the end,
    the error names the file and says the segmentation was written, instead of exit 3 with a log file."""
    import errno

    from liversam.commands.segment import _write_error_as_output_error
    from liversam.errors import OutputError

    with pytest.raises(OutputError) as caught, _write_error_as_output_error(tmp_path / "r.json", tmp_path / "s.nrrd"):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "r.json"))
    message = str(caught.value)
    assert f"Cannot write '{tmp_path / 'r.json'}': Permission denied" in message
    assert f"The segmentation was written to '{tmp_path / 's.nrrd'}'" in message
