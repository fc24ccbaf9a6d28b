"""The LiverSAM module lists the models the server's machine can load, fine-tuned ones included, and runs the one chosen.

TRAINING.md, LiverSAMTrain's help and the model list's tooltip said a model trained with LiverSAMTrain appears in the
LiverSAM module's model list; the list held only the configured model and checkpoint files picked by hand. The
registry lives on the server's machine (``$LIVERSAM_HOME/models/registry.json``) and the module does not import the
core: the server lists its machine's models (``GET /v1/models``), the module's connection reads that list when it
reaches the server, and the widget offers the available ones; choosing one stops the local server, which starts with
``--model NAME`` at the next request.

1. The endpoint, in-process (Starlette's test client), on a temporary ``LIVERSAM_HOME``: built-in and registered
   models, which of them have their weights, the model the server runs; a registry that cannot be read.
2. The module's own code (``ServerConnection``, the widget's ``_showServerState`` / ``_onServerSettingsEdited``)
   against real ``liversam serve`` processes: a model registered there (the bundled LiteMedSAM weights saved as a
   LiverSAMTrain checkpoint) is offered, chosen, and the server restarted with it segments a slice with it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402
from test_slicer_widget_state import Label, widgets  # noqa: E402, F401  (the fixture)

from liversam.server.app import create_app  # noqa: E402
from liversam.server.config import ServerConfig  # noqa: E402
from slicer_harness import REPO_ROOT  # noqa: E402

TOKEN = "models-test-token-0123456789"


def register(home: Path, name: str, path: Path, description: str = "") -> None:
    """An entry in the model registry, as ``liversam train`` writes it (register_user_model)."""
    registry = home / "models" / "registry.json"
    registry.parent.mkdir(parents=True, exist_ok=True)
    entries = json.loads(registry.read_text()) if registry.is_file() else []
    entries.append({"name": name, "path": str(path), "description": description, "metadata": {}})
    registry.write_text(json.dumps(entries))


def never_loaded():
    raise AssertionError("listing the models loaded one")


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("LIVERSAM_HOME", str(home))
    return home


def get_models(config: ServerConfig, token: str = TOKEN):
    with TestClient(create_app(config, model_loader=never_loaded), raise_server_exceptions=False) as client:
        return client.get("/v1/models", headers={"Authorization": f"Bearer {token}"})


def test_the_server_lists_built_in_and_registered_models_and_which_it_can_load(home, tmp_path):
    trained = tmp_path / "runA" / "best.pt"
    trained.parent.mkdir()
    trained.write_bytes(b"a LiverSAMTrain checkpoint")
    register(home, "runA", trained, "liver fine-tuned on 12 studies")
    register(home, "gone", tmp_path / "deleted" / "best.pt")  # its checkpoint was deleted since
    (home / "models" / "sam_vit_b_01ec64.pth").write_bytes(b"the official file")  # what --model sam_vit_b loads

    answer = get_models(ServerConfig(tokens=[TOKEN], model="runA"))
    assert answer.status_code == 200, answer.text
    listing = answer.json()
    models = {m["name"]: m for m in listing["models"]}
    print(json.dumps(listing, indent=1))
    assert listing["current"] == "runA"
    assert models["runA"] == {"name": "runA", "description": "liver fine-tuned on 12 studies", "kind": "registered",
                              "available": True}  # fmt: skip
    assert models["gone"]["kind"] == "registered" and not models["gone"]["available"]
    assert models["litemedsam"]["kind"] == "built-in" and models["litemedsam"]["available"]
    assert models["sam_vit_b"]["available"] and not models["sam_vit_l"]["available"]
    assert list(models)[:5] == ["litemedsam", "sam_vit_b", "sam_vit_l", "sam_vit_h", "medsam_vit_b"]


def test_the_model_list_needs_the_token_and_names_an_unreadable_registry(home):
    assert get_models(ServerConfig(tokens=[TOKEN]), token="not-the-token-0123456789").status_code == 401
    (home / "models").mkdir(parents=True)
    (home / "models" / "registry.json").write_text("{not json")
    answer = get_models(ServerConfig(tokens=[TOKEN]))
    detail = answer.json()["detail"]
    assert answer.status_code == 503 and "model registry on the server's machine cannot be read" in detail, detail
    assert "administrator" in detail and "server's log" in detail  # who can fix it, and where to look
    assert str(home) not in detail  # the server's paths stay in its log
    assert "the server's model cannot be used" not in detail  # (the ModelError handler's words: the model is fine)
    (home / "models" / "registry.json").write_text('[{"nom": "runA"}]')  # JSON, but not registry entries: was a 500
    answer = get_models(ServerConfig(tokens=[TOKEN]))
    assert answer.status_code == 503 and "cannot be read" in answer.json()["detail"], answer.text


def test_descriptions_older_versions_wrote_give_no_server_paths(home, tmp_path):
    """A registry written by an older LiverSAM holds "LiverSAMTrain model /abs/path/best.pt; validation Dice 0.912" (or
    "trained model /abs/path"): GET /v1/models gave every token holder the server's user names and folders."""
    for name, description in (
        ("old", f"LiverSAMTrain model {tmp_path}/alice/runs/patients A/best.pt; validation Dice 0.912"),
        ("older", f"trained model {tmp_path}/alice/runs/b/best.pt"),
        ("own", f"liver model, data in {tmp_path}/alice/data (ask alice)"),
        ("plain", "liver fine-tuned on 12 studies, and/or 1 / 2"),
    ):
        register(home, name, tmp_path / name / "best.pt", description)
    listing = get_models(ServerConfig(tokens=[TOKEN], model=str(tmp_path / "alice" / "mine.pt"))).json()
    models = {m["name"]: m["description"] for m in listing["models"]}
    assert models["old"] == "LiverSAMTrain model best.pt; validation Dice 0.912"
    assert models["older"] == "trained model best.pt"
    assert models["own"] == "liver model, data in data (ask alice)"
    assert models["plain"] == "liver fine-tuned on 12 studies, and/or 1 / 2"  # text with slashes, no path: as it is
    assert listing["current"] == "mine.pt"
    assert str(tmp_path) not in json.dumps(listing)


def test_the_servers_info_names_a_checkpoint_given_by_path_by_its_file_name(home, tmp_path):
    """``liversam serve --model /home/alice/runs/a/best.pt``: GET /v1/info named the model by that path for every token
    holder (before the model is loaded, and a loaded checkpoint's name too), as /v1/models no longer does."""
    config = ServerConfig(tokens=[TOKEN], model=str(tmp_path / "alice" / "runs" / "a" / "best.pt"))
    with TestClient(create_app(config, model_loader=never_loaded), raise_server_exceptions=False) as client:
        info = client.get("/v1/info", headers={"Authorization": f"Bearer {TOKEN}"})
    assert info.status_code == 200, info.text
    assert info.json()["model"]["name"] == "best.pt"
    assert str(tmp_path) not in info.text


def test_a_trained_models_default_description_names_its_run_not_its_path(home, tmp_path):
    """GET /v1/models gives every token holder the descriptions: the default one held the checkpoint's absolute
    path on the server's machine."""
    import torch

    from liversam.training.report import register_best_model

    checkpoint = tmp_path / "runC" / "best.pt"
    checkpoint.parent.mkdir()
    torch.save({"metadata": {"metrics": {"val_dice_mean": 0.9}}}, checkpoint)
    register_best_model(checkpoint, "runC")
    models = {m["name"]: m for m in get_models(ServerConfig(tokens=[TOKEN])).json()["models"]}
    assert models["runC"]["description"] == "LiverSAMTrain model of run 'runC'; validation Dice 0.900"


def test_an_unexpected_model_list_leaves_the_connection_usable():
    """A 200 that is not the list (a proxy's page, not JSON; JSON of another shape) raised out of connect() and left
    the connection 'starting' for good; the list is now left out, and the connection is made."""
    from LiverSAMLib.ServerClient import ServerUnavailable
    from LiverSAMLib.ServerConnection import list_models

    def client(answer):
        def models():
            if isinstance(answer, BaseException):
                raise answer
            return answer
        return SimpleNamespace(models=models)

    assert list_models(client(json.JSONDecodeError("Expecting value", "<html>", 0))) is None
    assert list_models(client(["litemedsam"])) is None and list_models(client({"models": "x"})) is None
    assert list_models(client({"models": [{"name": "runA"}, "junk"]})) == [{"name": "runA"}]
    with pytest.raises(ServerUnavailable):
        list_models(client(ServerUnavailable("gone")))


# --- the module ------------------------------------------------------------------------------------------------------
class ComboBox:
    """``QComboBox`` as the model list uses it: items (text, data, tooltip), the current one, blocked signals."""

    def __init__(self) -> None:
        self.items: list[dict] = []
        self.currentIndex = -1
        self.signals_blocked = False
        self.enabled = True
        self.toolTip = ""
        self.changes = 0  # currentIndexChanged emitted (with signals on)

    def clear(self) -> None:
        assert self.signals_blocked, "clearing the list with signals on would choose another model"
        self.items, self.currentIndex = [], -1

    def addItem(self, text: str, data=None) -> None:  # noqa: N802 - Qt's names
        assert self.signals_blocked or not self.items, "an entry added with signals on would restart the server"
        self.items.append({"text": text, "data": data, "tip": ""})
        if self.currentIndex < 0:
            self.currentIndex = 0

    def findData(self, data) -> int:  # noqa: N802
        return next((i for i, item in enumerate(self.items) if item["data"] == data), -1)

    def setItemData(self, index: int, value, role) -> None:  # noqa: N802
        assert role == "ToolTipRole"
        self.items[index]["tip"] = value

    def setCurrentIndex(self, index: int) -> None:  # noqa: N802
        if index != self.currentIndex and not self.signals_blocked:
            self.changes += 1
        self.currentIndex = index

    def blockSignals(self, block: bool) -> bool:  # noqa: N802
        self.signals_blocked = block
        return False

    @property
    def count(self) -> int:
        return len(self.items)

    @property
    def currentData(self):  # noqa: N802
        return self.items[self.currentIndex]["data"] if self.currentIndex >= 0 else None

    def texts(self) -> list[str]:
        return [item["text"] for item in self.items]


class Settings(dict):
    def value(self, key, default=None):
        return self.get(key, default)

    def setValue(self, key, value) -> None:  # noqa: N802
        self[key] = value


def trained_checkpoint(folder: Path) -> Path:
    """The bundled LiteMedSAM weights as a LiverSAMTrain checkpoint (what ``liversam train`` registers)."""
    import torch

    from liversam.models import LIVERSAM_CHECKPOINT_FORMAT
    from liversam.models.checkpoints import extract_state_dict, safe_torch_load
    from liversam.models.registry import bundled_litemedsam_path

    path = bundled_litemedsam_path()
    state = extract_state_dict(safe_torch_load(path), path)
    target = folder / "best.pt"
    torch.save({"format": LIVERSAM_CHECKPOINT_FORMAT, "base_model": "litemedsam", "model_state": state,
                "metadata": {"name": "runA", "epochs": 3}}, target)  # fmt: skip
    return target


@pytest.mark.slicer
@pytest.mark.model
def test_the_module_offers_a_registered_model_and_restarts_the_server_with_it(widgets, home, tmp_path, monkeypatch):  # noqa: F811
    module, _train = widgets
    (tmp_path / "runA").mkdir()
    register(home, "runA", trained_checkpoint(tmp_path / "runA"), "liver fine-tuned on 12 studies")
    register(home, "gone", tmp_path / "deleted" / "best.pt")
    monkeypatch.setenv("LIVERSAM_SERVER_PYTHONPATH", str(REPO_ROOT / "LiverSAM"))
    store = Settings({"LiverSAM/Server/mode": "local", "LiverSAM/Server/python": sys.executable,
                      "LiverSAM/Server/model": "litemedsam", "LiverSAM/Server/device": "cpu"})  # fmt: skip
    monkeypatch.setattr(module.qt, "QSettings", lambda: store, raising=False)
    monkeypatch.setattr(module.qt, "Qt", SimpleNamespace(ToolTipRole="ToolTipRole"), raising=False)
    logic = module.LiverSAMLogic(settingsStore=store)
    widget = module.LiverSAMWidget.__new__(module.LiverSAMWidget)
    widget.logic, widget._serverPathTimer, widget._job = logic, None, None
    widget._reconfigureServer = lambda settings: logic.connection.reset(settings)  # no job, no sessions here
    combo = ComboBox()
    widget.ui = SimpleNamespace(
        modelComboBox=combo, serverStatusLabel=Label(), serverModeComboBox=SimpleNamespace(currentData="local"),
        serverPythonPathLineEdit=SimpleNamespace(currentPath=sys.executable, enabled=True),
        serverUrlLineEdit=SimpleNamespace(text="", enabled=False), serverTokenLineEdit=SimpleNamespace(text="", enabled=False),
        deviceComboBox=SimpleNamespace(currentText="cpu", enabled=True), serverPythonLabel=SimpleNamespace(enabled=True),
        addCheckpointButton=SimpleNamespace(enabled=True), serverStopButton=SimpleNamespace(enabled=False),
    )  # fmt: skip
    combo.addItem("litemedsam", "litemedsam")  # what _setupServerSection puts there: the configured model
    try:
        logic.connection.connect()  # as the first request (or Connect) does; the model itself is not loaded
        widget._showServerState()
        print("model list:", combo.texts(), [item["tip"] for item in combo.items])
        assert "runA (trained)" in combo.texts() and "gone (trained)" not in combo.texts()
        assert combo.items[combo.findData("runA")]["tip"] == "liver fine-tuned on 12 studies"
        assert combo.texts().count("litemedsam") == 1 and combo.findData("sam_vit_b") < 0  # no weights there
        assert combo.currentData == "litemedsam" and logic.connection.started_here  # adding chose nothing

        combo.setCurrentIndex(combo.findData("runA"))  # the user chooses it
        widget._onServerSettingsEdited()
        assert logic.connection.settings.model == "runA" and store["LiverSAM/Server/model"] == "runA"
        assert not logic.connection.started_here  # the server that ran LiteMedSAM was stopped
        client = logic.connection.connect()  # the next request starts it again, with --model runA
        process = logic.connection._process.process
        assert process.args[process.args.index("--model") + 1] == "runA"
        session = client.open_volume(np.full((2, 64, 64), -50, np.int16), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0))
        mask, _score = client.predict_slice(session["session_id"], 0, boxes_ij=[(10, 10, 40, 40)])
        info = client.info()["model"]
        print("the restarted server:", info)
        assert info["loaded"] and info["name"] == "runA" and mask.shape == (64, 64)
        widget._showServerState()
        assert combo.texts().count("runA (trained)") == 1  # listed again, not twice

        (tmp_path / "runB").mkdir()  # trained and registered while the module is connected
        register(home, "runB", trained_checkpoint(tmp_path / "runB"), "another run")
        widget._withClient = lambda work, done, what, key=None: done(work(logic.connection.ensure()))
        widget._serverSettingsFromGui = lambda: logic.connection.settings
        widget.onConnectServer()  # Connect reads the list again (it returned at once when connected)
        assert "runB (trained)" in combo.texts(), combo.texts()
    finally:
        logic.stopServer()
