"""The LiverSAM web page: trame-slicer views (axial, coronal, sagittal, 3D) + LiverSAM's workflow panel.

Every segmentation call goes to ``liversam serve`` through ``LiverSAMLib.ServerClient`` (run in a worker
thread so the page stays live); MRML (views, segments, markups) is touched on trame's event loop only.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any

import numpy as np
from trame.app import get_server
from trame.ui.vuetify3 import VAppLayout
from trame.widgets import html
from trame.widgets import vuetify3 as v3
from trame_server.utils.asynchronous import create_task
from trame_slicer import module as trame_slicer_module
from trame_slicer.app.ui import FlexContainer
from trame_slicer.core import LayoutManager, SlicerApp
from trame_slicer.rca_view import register_rca_factories
from vtkmodules.vtkCommonCore import vtkCommand

from .export_names import case_stem, case_title, export_names
from .mrml_scene import (
    MAX_FOLDER_FILES,
    MIN_VOLUME_IMAGES,
    DicomSource,
    InputError,
    SceneContent,
    SeriesChoice,
    dicom_file_series,
    dicom_series_choices,
    list_input_files,
    load_ct_with_source,
    pick_series,
    remove_volume,
    reorient_volume_to_axial,
)
from .review_table import lesion_rows, review_items, review_rows
from .server_client import LiverSAMClient, LiverSAMClientError, ServerRequestError, ServerUnavailable
from .slice_prompting import CLICK_TOLERANCE_PX, SlicePrompting
from .uploads import (
    is_zip,
    left_out_note,
    lone_dicom_slice,
    lone_slice_message,
    no_dicom_message,
    single_image_header,
    split_dicom_files,
    too_many_files_message,
    unpack_zip,
    upload_subject,
    write_uploads,
)
from .view_gutters import PROBE_VIEW, slice_view_gutter, threed_view_gutter
from .view_mouse import OffAxialGestures, set_window_level_drag
from .volume_geometry import (
    PromptOutsideVolume,
    ServerGeometry,
    box_on_slice,
    point_on_volume,
    ras_to_ijk,
    server_geometry,
    slice_plane,
)
from .workflow import FAST_THIN_SLICE_MM, SEGMENTS, Workflow, segment_word

logger = logging.getLogger("liversam_web")

WINDOW_PRESETS = {"Abdomen": (400.0, 40.0), "Liver": (150.0, 60.0), "Bone": (1800.0, 400.0), "Lung": (1500.0, -600.0)}
LAYOUT_ID = "Axial Primary"
CELL = "padding: 2px 4px; overflow-wrap: anywhere; line-height: 1.2"  # review table cells: narrow, wrapping
UPLOAD_FIELDS = ("file", "folder")
# the upload fields: one CT file, every file of a DICOM series, or a .zip of its folder; a DICOM series' folder
FILE_FIELD_LABEL = "Upload a CT file, a series' files or a .zip"
FOLDER_FIELD_LABEL = "Upload a DICOM folder"
DICOM_SEG_NOTE = "DICOM SEG: for a CT opened from a DICOM series (it references that series)."
DICOM_SEG_IRREGULAR = ("DICOM SEG: not for this CT. Its DICOM slices form no regular grid, so the CT shown is interpolated "
                       "onto one: a DICOM SEG cannot reference slices the series does not have. Export .seg.nrrd or a "
                       "labelmap instead")
JOB_POLL_S = 0.25
PREFETCH_DELAY_S = 0.4  # the user has settled on a slice
PREFETCH_RADIUS = 2



@dataclass(frozen=True)
class SeriesOrigin:
    """Files holding several DICOM series (an upload, a folder typed), kept so that another of their series opens
    from the page's series list without uploading again, named and exported as the first was: the files of the CT
    shown, or files whose series tried could not be opened (listed beside the CT shown's, see ``LiverSAMWebApp``)."""

    files: tuple[str, ...]
    choices: tuple[SeriesChoice, ...]
    whose: str  # "of the uploaded folder 'cd'", "in the folder '/data/cd'": "The DICOM series 2 'X' " + whose
    display_name: str
    stem: str | None
    source: str
    note: str  # the upload's files left out (not DICOM)
    uploaded: bool
    upload_dir: Path | None = None  # the upload's folder, kept while its series are listed
    failed: dict[str, str] = dataclass_field(default_factory=dict)  # the series tried that could not be opened: key -> why


@dataclass
class NewCase:
    """What an open has added so far: the CT read into the scene, its scene content (segmentation, markups) and its
    server session; taken away again (``LiverSAMWebApp._discard``) unless the open completes (``committed``)."""

    volume: Any
    content: SceneContent | None = None
    session: str | None = None
    committed: bool = False


# the page's state that shows the open case: put back as it was when showing a new case fails half way
CASE_STATE = ("has_ct", "has_dicom", "dicom_note", "ct_name", "ct_source", "n_slices", "export_names", "probe",
              "window", "level", "axial_k", "review_rows", "review_items", "review_segment", "lesion_rows", "progress",
              "propagated", "series_rows", "series_caption", "other_series_rows", "other_series_caption",
              "can_undo", "undo_label")


def _first_upper(text: str) -> str:
    """"series 2 'Abdomen'" -> "Series 2 'Abdomen'" (str.capitalize lowers the rest: 'abdomen')."""
    return text[:1].upper() + text[1:]


def series_display_name(display_name: str, n_files: int, num_files: int, label: str) -> str:
    """The name of one series of several files: "20 DICOM files in cd" uploaded, "12 DICOM files of series 1 'Abdomen
    1.0' in cd" shown; a folder typed, "cd": "cd: series 1 'Abdomen 1.0'"."""
    many = f"{n_files} DICOM files"
    if many in display_name:
        return display_name.replace(many, f"{num_files} DICOM files of {label}", 1)
    return f"{display_name}: {label}"


def series_stem(stem: str, choices: tuple[SeriesChoice, ...], chosen: SeriesChoice) -> str:
    """The exports' stem of one series of files holding several: "cd-s2" for series 2, "cd-series3" for the third
    of the list when it has no number (or shares its number with another). Each series was exported under the
    files' stem alone: series 1 and series 2 both gave "cd-liversam.seg.nrrd"."""
    numbers = [c.number for c in choices]
    if chosen.number is not None and numbers.count(chosen.number) == 1:
        return f"{stem}-s{chosen.number}"
    index = next((i for i, c in enumerate(choices) if c.key == chosen.key), 0)
    return f"{stem}-series{index + 1}"


def series_what(chosen: SeriesChoice) -> str:
    """"The DICOM series 2 'X'", "The DICOM series with no number 'X'" (its label said "The DICOM a series 'X'")."""
    if chosen.number is not None:
        return f"The DICOM {chosen.label}"
    return "The DICOM series with no number" + (f" '{chosen.description}'" if chosen.description else "")


def series_note(dicom: DicomSource, as_chosen: bool, of_file_typed: bool) -> str:
    """The status line's words on the DICOM series found beside the one opened: which was opened and why, the
    others (why each is not opened first), and how to open another (the page's series list)."""
    others = "; ".join(dicom.other_series[:6]) + (f"; and {len(dicom.other_series) - 6} more"
                                                  if len(dicom.other_series) > 6 else "")
    opened = f"{dicom.label} ({dicom.num_files} files)"
    if len(dicom.series) <= 1:  # one series holding parts of another acquisition or orientation
        return (f"Of the images of {dicom.label}, the largest volume was opened ({dicom.num_files} files); set aside: "
                f"{others}. ")
    if as_chosen:
        how = f"{opened} was opened, as chosen"
    elif of_file_typed:
        how = f"the one of the file typed was opened: {opened}"
    elif dicom.chosen is not None and dicom.chosen.why_not:
        how = (f"none is a CT series of {MIN_VOLUME_IMAGES} images or more; the first image series was opened: "
               f"{opened}: {dicom.chosen.why_not}")
    else:
        how = f"the largest CT series was opened: {opened}"
    return (f"Of the {len(dicom.series)} DICOM series found, {how}. Not opened: {others}. To open another, choose it "
            "in the series list (section 1). ")


def series_rows(choices: tuple[SeriesChoice, ...], shown: SeriesChoice | None,
                failed: Mapping[str, str] | None = None) -> list[dict]:
    """The page's series list: each series' number, description, images, modality, why it is not opened first;
    ``failed``: the series tried that could not be opened (key -> why), marked so and not offered again (they stayed
    clickable with nothing said, and failed again when clicked)."""
    failed = failed or {}
    return [{"key": c.key, "number": "" if c.number is None else str(c.number),
             "description": c.description or "(no description)", "images": c.images, "modality": c.modality or "?",
             "why": f"could not be opened: {failed[c.key]}" if c.key in failed else c.why_not,
             "openable": c.openable and c.key not in failed, "failed": c.key in failed,
             "shown": shown is not None and c.key == shown.key}
            for c in choices]


def short_reason(message: str, what: str) -> str:
    """Why a series could not be opened, short enough for its row in the series list: ``message`` without the
    series' name ``what`` it starts with, up to its first ":", "." or " (" ("does not look like a CT in Hounsfield
    units")."""
    text = message[len(what):].strip() if message.startswith(what) else message.strip()
    text = re.split(r":\s|\.\s|\.$|\s\(", text, maxsplit=1)[0].strip()
    return text if len(text) <= 90 else text[:87].rstrip() + "..."


def series_caption(origin: SeriesOrigin, ct_name: str, of_ct_shown: bool) -> str:
    """The words above a series list: whose files it lists (the upload or folder), and whether the CT shown is one
    of its series (``of_ct_shown``; a list kept after its first series failed to open replaced the CT shown's, with
    nothing saying so: the reader could take it for the CT shown's series)."""
    listed = f"DICOM series {origin.whose}"
    if of_ct_shown:
        return f"{listed}, the files of the CT shown (click another to open it instead)"
    if ct_name:
        return f"{listed}, chosen after the CT shown ({ct_name}), which is not one of them: click one to open it instead"
    return f"{listed}: none opened yet (click one to open it)"


class LiverSAMWebApp:
    """One page, one user: the CT, its server session and the workflow state live on this process."""

    def __init__(self, client: LiverSAMClient, server=None, server_label: str = "") -> None:
        self.client = client
        self.server = server or get_server(client_type="vue3")
        self.server.enable_module(trame_slicer_module)
        self.state, self.ctrl = self.server.state, self.server.controller
        self.slicer_app = SlicerApp()
        # the views' buttons say what they do (view_gutters: trame-slicer's said "Show in 3D" for a toggle)
        register_rca_factories(self.slicer_app.view_manager, self.server, slice_view_ui_f=slice_view_gutter,
                               three_d_view_ui_f=threed_view_gutter)
        self.layout_manager = LayoutManager(self.slicer_app.scene, self.slicer_app.view_manager, self.server)
        self.layout_manager.register_layout_dict(LayoutManager.default_grid_configuration())
        self.layout_manager.set_layout(LAYOUT_ID)

        self.content: SceneContent | None = None
        self.workflow: Workflow | None = None
        self._exported_at = None  # the workflow's change marker when it was last exported (its work then saved)
        # (the CT, the work's change marker) of the opening held back once for unexported work: the same CT opened
        # again on the same work goes on; another CT, or more work since, asks again
        self._discard_asked: tuple | None = None
        self.job_id: str | None = None
        self._job_segment = ""
        self._cancel_requested = False
        self._predict_lock = asyncio.Lock()
        self._prompting: SlicePrompting | None = None
        self._off_axial: list[OffAxialGestures] = []  # the coronal and sagittal views, which take no prompts
        self._axial_observer: tuple[Any, int] | None = None
        self._tmp = tempfile.TemporaryDirectory(prefix="liversam-web-")
        # uploads (folders "upload-*" in _tmp): those being opened, and the one the CT shown came from (its DICOM SEG
        # references it); every other one is removed once an open ends (they stayed until the app ended)
        self._uploads_open: set[Path] = set()
        self._shown_upload: Path | None = None
        # The series lists: the CT shown's files', when they hold several series; and beside it, files holding
        # several whose series tried could not be opened (an upload, a folder typed), kept until a CT opens (from them
        # or not), other such files fail, or the reader closes their list. (Their list replaced the CT shown's, which
        # came back only when its files were opened again.)
        self._shown_series: SeriesOrigin | None = None
        self._other_series: SeriesOrigin | None = None
        self._series_status = ""  # the status line's words on the other list (whose files, kept)

        self.state.update({
            "trame__title": "LiverSAM",
            "server_label": server_label,
            "ct_path": "",
            "ct_name": "",
            "ct_source": "",
            "upload_keys": {"file": 0, "folder": 0},  # a new key empties that upload field
            "series_rows": [],  # the DICOM series of the CT shown's files, when they hold several (series_rows)
            "series_caption": "",  # whose files the series list lists (series_caption)
            "other_series_rows": [],  # the series of files that opened nothing (an upload whose series tried failed)
            "other_series_caption": "",
            "has_ct": False,
            "has_dicom": False,
            "dicom_note": DICOM_SEG_NOTE,
            "busy": False,
            "busy_text": "",
            "error": "",
            "status": ("Open a CT: type its path on this machine, or upload a CT file or a DICOM series (all its files, "
                       "its folder, or a .zip of the folder)."),
            "segment": "liver",
            "mode": "box",
            "mode_hint": mode_hint("box", "liver"),
            "window": 400.0,
            "level": 40.0,
            "probe": "",
            "axial_k": 0,
            "n_slices": 0,
            "job_running": False,
            "progress": 0,
            "review_rows": [],
            "review_items": [],
            "review_segment": "",
            "lesion_rows": [],
            "can_undo": False,
            "undo_label": "",
            "propagated": [],
            "fast_thin": False,
            "export_names": export_names("ct"),
            "tumour_ring": True,
        })
        self.state.change("mode", "segment")(self._on_mode_change)
        self.state.change("window", "level")(self._on_window_change)
        self._build_ui()

    # ================================================================== UI
    def _build_ui(self) -> None:
        with VAppLayout(self.server, template_name="main") as self.ui:
            self.ui.root.theme = "dark"
            with v3.VAppBar(density="compact"):
                v3.VToolbarTitle("LiverSAM")
                # the case's name as the exports name it (lits117/ct.nii.gz, not ct.nii.gz); the whole path on hover
                html.Span("{{ ct_name }}", classes="text-body-2 mr-4", title=("ct_source",),
                          raw_attrs=['data-testid="ct-name"'])
                v3.VSpacer()
                html.Span("{{ server_label }}", classes="text-caption mr-4")
            with v3.VNavigationDrawer(permanent=True, width=380, location="left"):
                self._build_panel()
            # The voxel probe names the voxel under the mouse in the axial view: it is cleared when the mouse leaves
            # that view (it kept the mouse's last place there). The views send the server no "mouse left" event, so
            # the page says it: the mouse over another view (or a gap between views), or out of the views' area.
            left = self.server.trigger_name(self._on_probe_left)
            with v3.VMain(), FlexContainer(
                    row=True, fill_height=True, style="height: calc(100vh - 48px);",
                    mouseover=(f"probe && !$event.target.closest('.layout-grid-item')?.querySelector('[{PROBE_VIEW}]') "
                               f"&& trigger('{left}')"),
                    mouseleave=f"probe && trigger('{left}')"):
                self.layout_manager.initialize_layout_grid(self.ui)

    def _build_series_lists(self) -> None:
        """The DICOM series of the CT shown's files when they hold several (a CD-ROM export, a study's folder): each
        one's number, description, images and modality, the one shown marked, why the others were not opened first
        (not CT, a report, a localiser); a click on another opens it (the unexported-work guard as for any CT).
        Under it, the series of files whose series tried could not be opened (an upload), to choose another of
        them, with a button that closes that list (and removes the upload's files)."""
        self._build_series_list("series", "shown")
        self._build_series_list("other-series", "other")

    def _build_series_list(self, name: str, which: str) -> None:
        """One series list: ``name`` its test ids' prefix ("series", "other-series"; its state ``series_rows``,
        ``other_series_rows``), ``which`` the list a click opens from (``open_series``)."""
        choose = self.server.trigger_name(self.open_series)
        rows, caption = f"{name.replace('-', '_')}_rows", f"{name.replace('-', '_')}_caption"
        with html.Div(v_if=f"{rows}.length > 1", classes="mt-2" if which == "shown" else "mt-3 pt-2 border-t",
                      raw_attrs=[f'data-testid="{name}-list"']):
            # whose files they are: the CT shown's, or an upload's whose series tried could not be opened
            with html.Div(classes="d-flex align-start ga-1"):
                html.Div(f"{{{{ {caption} }}}}", classes="text-caption flex-grow-1",
                         raw_attrs=[f'data-testid="{name}-caption"'])
                if which == "other":
                    v3.VBtn("Close", size="x-small", variant="text", click=self.ctrl.forget_other_series,
                            disabled=("busy",), raw_attrs=['data-testid="other-series-close"',
                                                           'title="Close this list (an upload\'s files are removed)"'])
            with html.Div(style="max-height: 200px; overflow-y: auto; overflow-x: hidden"), \
                    v3.VTable(density="compact", style="table-layout: fixed; width: 100%"):
                with html.Colgroup():
                    for width in ("12%", "44%", "21%", "23%"):
                        html.Col(style=f"width: {width}")
                with html.Thead(), html.Tr():
                    for title in ("#", "description", "images", "modality"):
                        html.Th(title, style=CELL)
                with html.Tbody():
                    with html.Tr(v_for=f"row in {rows}", key="row.key",
                                 click=(f"row.openable && !row.shown && !busy && !job_running && "
                                        f"trigger('{choose}', [row.key, '{which}'])"),
                                 style=("{ cursor: row.openable && !row.shown ? 'pointer' : 'default' }",),
                                 classes=("{ 'text-primary font-weight-bold': row.shown, "
                                          "'text-medium-emphasis': !row.openable && !row.failed }",),
                                 raw_attrs=[f'data-testid="{name}-row"', ':aria-current="row.shown"',
                                            ':aria-disabled="!row.openable"']):
                        html.Td("{{ row.number }}", style=CELL)
                        with html.Td(style=CELL):
                            html.Span("{{ row.description }}{{ row.shown ? ' (shown)' : '' }}")
                            html.Div("{{ row.why }}", v_if="row.why", classes=("row.failed ? "
                                     "'text-caption text-error' : 'text-caption text-warning'",),
                                     raw_attrs=[f'data-testid="{name}-why"'])
                        html.Td("{{ row.images }}", style=CELL)
                        html.Td("{{ row.modality }}", style=CELL)

    def _build_panel(self) -> None:
        with html.Div(classes="pa-3 d-flex flex-column ga-3"):
            # The messages, and a running job's progress and Cancel, stay at the top of the panel however far it is
            # scrolled (at 1400 x 900 the progress and Cancel under section 4 were below the fold).
            with html.Div(classes="d-flex flex-column ga-2 pb-1", raw_attrs=['data-testid="messages"'],
                          style="position: sticky; top: 0; z-index: 5; background: rgb(var(--v-theme-surface))"):
                # a long path wraps anywhere (the file's name at its end was cut off)
                v3.VAlert(
                    v_if="error", type="error", density="compact", text=("error",), closable=True,
                    click_close="error = ''", raw_attrs=['data-testid="error"'], style="overflow-wrap: anywhere",
                )
                v3.VAlert(v_if="status && !error", type="info", density="compact", variant="tonal",
                          text=("status",), raw_attrs=['data-testid="status"'], style="overflow-wrap: anywhere")
                with html.Div(v_if="job_running", classes="d-flex align-center ga-2"):
                    v3.VProgressLinear(model_value=("progress",), height=16, color="primary", rounded=True,
                                       raw_attrs=['data-testid="progress"'])
                    v3.VBtn("Cancel", color="warning", size="small", click=self.ctrl.cancel_job,
                            raw_attrs=['data-testid="cancel"'])
            # ---- open a CT
            with v3.VCard(title="1. Open a CT", density="compact"), v3.VCardText():
                with html.Div(classes="d-flex align-center ga-2"):
                    v3.VTextField(v_model=("ct_path",), label="Path on this machine (file or DICOM folder)",
                                  density="compact", hide_details=True, raw_attrs=['data-testid="ct-path"'],
                                  keyup_enter=(self.ctrl.open_path, "[ct_path]"))
                    v3.VBtn("Open", click=(self.ctrl.open_path, "[ct_path]"), disabled=("busy",),
                            raw_attrs=['data-testid="open-path"'])
                # one field a line, its whole label in sight (side by side, "CT file(s) or .zip" was cut to "CT file(s)...")
                with html.Div(classes="d-flex flex-column ga-2 mt-2"):
                    upload = self.server.trigger_name(self._on_upload)
                    too_many = self.server.trigger_name(self._on_too_many_files)
                    for label, kind in ((FILE_FIELD_LABEL, "file"), (FOLDER_FIELD_LABEL, "folder")):
                        # a new key empties a field whose files are not the CT shown (the folder field kept the last
                        # uploaded folder's file after a CT was opened by its path)
                        with v3.VFileInput(
                            label=label, density="compact", hide_details=True, multiple=True, clearable=False,
                            prepend_icon="mdi-folder-upload" if kind == "folder" else "mdi-file-upload",
                            key=(f"upload_keys.{kind}",), style="min-width: 0",
                            # each file's path in the folder chosen: a CD-ROM export has files of one name
                            # (IM0001) in each series' folder, which overwrote each other
                            # more files than a folder typed may hold are not sent at all (each is sent whole)
                            disabled=("busy",),
                            change=(f"$event.target.files.length > {MAX_FOLDER_FILES} ? trigger('{too_many}', "
                                    f"[$event.target.files.length, ($event.target.files[0] || {{}}).webkitRelativePath "
                                    f"|| '', '{kind}']) : trigger('{upload}', [$event.target.files, "
                                    "($event.target.files[0] || {}).webkitRelativePath || '', "
                                    f"'{kind}', Array.from($event.target.files, "
                                    "(f) => f.webkitRelativePath || '')])"),
                            raw_attrs=(['webkitdirectory', 'data-testid="upload-folder"'] if kind == "folder"
                                       else ['data-testid="upload-file"']),
                        ), v3.Template(v_slot_selection="{ fileNames }"):
                            # on one line, cut with "..." (a file's name wrapped at its dots); a folder's file count
                            html.Span("{{ fileNames.length }} files" if kind == "folder" else
                                      "{{ fileNames.length > 1 ? fileNames.length + ' files' : fileNames.join(', ') }}",
                                      style="display: block; min-width: 0; max-width: 100%; white-space: nowrap; "
                                            "overflow: hidden; text-overflow: ellipsis")
                self._build_series_lists()
            # ---- view
            with v3.VCard(title="2. View", density="compact", v_if="has_ct"), v3.VCardText():
                with html.Div(classes="d-flex flex-wrap ga-1"):
                    for name, (width, level) in WINDOW_PRESETS.items():
                        # the preset shown is highlighted (active): the sliders at its window and level
                        shown = f"window == {width:g} && level == {level:g}"
                        v3.VBtn(name, size="small", variant="tonal", click=f"window = {width:g}; level = {level:g}",
                                active=(shown,), color=(f"{shown} ? 'primary' : undefined",),
                                raw_attrs=[f'data-testid="preset-{name.lower()}"', f':aria-pressed="{shown}"'])
                # each slider with its value beside it (the thumb label showed it only while dragged)
                for name, low, high in (("window", 1, 3000), ("level", -1000, 1500)):
                    with v3.VSlider(v_model=(name,), min=low, max=high, step=1, label=name.capitalize(),
                                    density="compact", hide_details=True, thumb_label=True,
                                    raw_attrs=[f'data-testid="{name}"']), v3.Template(v_slot_append=True):
                        html.Span(f"{{{{ Math.round({name}) }}}}", classes="text-body-2",
                                  style="min-width: 3.2em; text-align: right; font-variant-numeric: tabular-nums",
                                  raw_attrs=[f'data-testid="{name}-value"'])
                with html.Div(classes="d-flex align-center ga-2 mt-1"):
                    v3.VTextField(v_model_number=("axial_k",), type="number", label="Axial slice k",
                                  density="compact", hide_details=True, style="max-width: 140px",
                                  raw_attrs=['data-testid="axial-k"'],
                                  change=(self.ctrl.go_to_slice, "[$event.target.value]"),
                                  keyup_enter=(self.ctrl.go_to_slice, "[$event.target.value]"))
                    html.Span("of {{ n_slices }} (mouse wheel scrolls)", classes="text-caption")
                html.Div("{{ probe }}", classes="text-caption mt-1", raw_attrs=['data-testid="probe"'],
                         style="min-height: 1.2em; font-family: monospace")
            # ---- prompts
            with v3.VCard(title="3. Prompt in the axial view", density="compact", v_if="has_ct"), v3.VCardText():
                with v3.VBtnToggle(v_model=("segment",), mandatory=True, density="compact", color="primary",
                                   divided=True, classes="mb-2"):
                    v3.VBtn("Liver", value="liver", raw_attrs=['data-testid="segment-liver"'])
                    v3.VBtn("Tumour", value="tumor", raw_attrs=['data-testid="segment-tumor"'])
                with v3.VBtnToggle(v_model=("mode",), mandatory=True, density="compact", color="secondary",
                                   divided=True):
                    v3.VBtn("Box", value="box", prepend_icon="mdi-vector-rectangle", raw_attrs=['data-testid="mode-box"'])
                    v3.VBtn("+", value="point+", raw_attrs=['data-testid="mode-plus"'])
                    v3.VBtn("-", value="point-", raw_attrs=['data-testid="mode-minus"'])
                    v3.VBtn("Browse", value="navigate", raw_attrs=['data-testid="mode-navigate"'])
                html.Div("{{ mode_hint }}", classes="text-caption mt-2", raw_attrs=['data-testid="mode-hint"'])
                with html.Div(classes="d-flex flex-wrap ga-2 mt-2"):
                    v3.VBtn("Clear this slice", size="small", click=(self.ctrl.clear_slice, "[segment]"),
                            disabled=("busy",))
                    v3.VBtn("Undo", size="small", prepend_icon="mdi-undo", click=self.ctrl.undo,
                            disabled=("!can_undo || busy || job_running",), raw_attrs=['data-testid="undo"'])
                html.Div("{{ can_undo ? 'Undo: ' + undo_label : '' }}", classes="text-caption",
                         raw_attrs=['data-testid="undo-label"'])
            # ---- propagation
            with v3.VCard(title="4. Propagate through the volume", density="compact", v_if="has_ct"), \
                    v3.VCardText():
                with html.Div(classes="d-flex flex-wrap ga-2"):
                    # the click carries what the button and the checkboxes show (see ``propagate``)
                    v3.VBtn("Propagate {{ segment === 'tumor' ? 'tumours' : 'liver' }}", color="primary",
                            click=(self.ctrl.propagate, "[segment, fast_thin, tumour_ring]"),
                            disabled=("busy || job_running",), raw_attrs=['data-testid="propagate"'])
                    v3.VBtn("Re-propagate from slice {{ axial_k }}", click=(self.ctrl.repropagate, "[segment]"),
                            disabled=("busy || job_running || !propagated.includes(segment)",),
                            raw_attrs=['data-testid="repropagate"'])
                v3.VCheckbox(v_model=("fast_thin",), density="compact", hide_details=True,
                             disabled=("job_running",), raw_attrs=['data-testid="fast-thin"'],
                             label=f"Faster on thin slices: the liver on slices of {FAST_THIN_SLICE_MM:g} mm or less is "
                                   "predicted on every other slice and interpolated between (slightly less accurate)")
                v3.VCheckbox(v_model=("tumour_ring",), density="compact", hide_details=True,
                             disabled=("job_running",), raw_attrs=['data-testid="tumour-ring"'],
                             label="Tumour outline includes its partial-volume ring: the voxels just outside it that "
                                   "still lean to the tumour (off: the core only; a fix keeps the setting its "
                                   "propagation had)")
            # ---- review and lesions
            # shown from the start, so that the sections are numbered 1 to 6 at every step (it was 1, 2, 3, 4, 6 before the
            # first propagation)
            with v3.VCard(title="5. Review", density="compact", v_if="has_ct"), v3.VCardText():
                html.Div("After a propagation: the slices to check, and every slice's area, score and flags.",
                         classes="text-caption", v_if="!review_rows.length", raw_attrs=['data-testid="review-empty"'])
                with html.Div(v_if="review_rows.length"):
                    html.Div("To check (click: the views go to the first slice of the range)", classes="text-caption",
                             v_if="review_items.length")
                    html.Div("Nothing flagged for review.", classes="text-caption", v_if="!review_items.length",
                             raw_attrs=['data-testid="review-none"'])
                    with html.Div(v_for="item in review_items", key="item.first", style="cursor: pointer",
                                  classes="text-body-2 text-warning mb-1",
                                  click=(self.ctrl.jump_to_slice, "[item.first]"), raw_attrs=['data-testid="review-item"']):
                        html.B("{{ item.segment }} {{ item.slices }}: ")
                        html.Span("{{ item.reason }}")
                    html.Div("{{ review_segment === 'tumor' ? 'tumour' : review_segment }}: every slice, flagged slices first (click a row: the views go there)",
                             classes="text-caption mt-2")
                    # fixed columns that fit the panel, the flags wrapped (the "from" column was cut to "fr")
                    with html.Div(style="max-height: 220px; overflow-y: auto; overflow-x: hidden",
                                  raw_attrs=['data-testid="review-table"']), \
                            v3.VTable(density="compact", style="table-layout: fixed; width: 100%"):
                        with html.Colgroup():
                            for width in ("13%", "17%", "15%", "30%", "25%"):
                                html.Col(style=f"width: {width}")
                        with html.Thead(), html.Tr():
                            for title in ("k", "mm²", "score", "flags", "from"):
                                html.Th(title, style=CELL)
                        with html.Tbody():
                            with html.Tr(v_for="row in review_rows", key="row.k", style="cursor: pointer",
                                         click=(self.ctrl.jump_to_slice, "[row.k]"), raw_attrs=['data-testid="review-row"']):
                                html.Td("{{ row.k }}", style=CELL)
                                html.Td("{{ row.area }}", style=CELL)
                                html.Td("{{ row.score }}", style=CELL)
                                html.Td("{{ row.flags }}", classes="text-warning", style=CELL,
                                        raw_attrs=['data-testid="review-flags"'])
                                html.Td("{{ row.source }}", style=CELL, raw_attrs=['data-testid="review-source"'])
            with v3.VCard(title="Lesions", density="compact", v_if="lesion_rows.length"), v3.VCardText():
                with v3.VTable(density="compact"):
                    with html.Thead(), html.Tr():
                        for title in ("#", "mL", "axial Ø mm", "slices"):
                            html.Th(title)
                    with html.Tbody():
                        with html.Tr(v_for="row in lesion_rows", key="row.id", style="cursor: pointer",
                                     click=(self.ctrl.jump_to_slice, "[row.centre_k]"), raw_attrs=['data-testid="lesion-row"']):
                            html.Td("{{ row.id }}")
                            html.Td("{{ row.ml }}")
                            html.Td("{{ row.diameter }}")
                            html.Td("{{ row.slices }}")
            # ---- export
            with v3.VCard(title="6. Export", density="compact", v_if="has_ct"), v3.VCardText(), \
                    html.Div(classes="d-flex flex-wrap ga-2"):
                for label, kind, disabled in (
                        (".seg.nrrd", "segnrrd", "busy"),
                        ("Labelmap .nii.gz", "labelmap", "busy"),
                        ("DICOM SEG", "dicomseg", "busy || !has_dicom")):
                    v3.VBtn(
                        label, size="small", prepend_icon="mdi-download", disabled=(disabled,),
                        raw_attrs=[f'data-testid="export-{kind}"'],
                        # a refused export (its message is on the page) downloads nothing: no file of "null";
                        # the file is named after the CT (export_names)
                        click=(f"trigger('{self.server.trigger_name(self.export)}', ['{kind}']).then((data) => data "
                               f"&& utils.download(export_names['{kind}'], data, 'application/octet-stream'))"),
                    )
                html.Div("{{ dicom_note }}", v_if="!has_dicom", classes="text-caption", raw_attrs=['data-testid="dicomseg-note"'])
        self.ctrl.open_path = self.open_path
        self.ctrl.open_series = self.open_series
        self.ctrl.forget_other_series = self.forget_other_series
        self.ctrl.go_to_slice = self.go_to_slice
        self.ctrl.clear_slice = self.clear_slice
        self.ctrl.undo = self.undo
        self.ctrl.propagate = self.propagate
        self.ctrl.repropagate = self.repropagate
        self.ctrl.cancel_job = self.cancel_job
        self.ctrl.jump_to_slice = self.jump_to_slice

    # ================================================================== messages
    def _error(self, message: str) -> None:
        logger.info("user error: %s", message)
        with self.state:
            self.state.error = message

    def _status(self, message: str) -> None:
        logger.debug("status: %s", message)
        with self.state:
            self.state.error = ""
            self.state.status = message

    # ================================================================== open a CT
    def open_path(self, path: str | None = None, *_args) -> None:
        """Open the typed path; the page sends the field's value with the click (the state may lag behind)."""
        create_task(self._open_path(self.state.ct_path if path is None else path))

    async def _open_path(self, path: str | None) -> None:
        path = str(path or "").strip()
        try:
            files = list_input_files(path)
            # one file of a DICOM series: its series, read from its folder, as `liversam segment` reads it (it said
            # "a single 2D image, not a CT volume")
            series = dicom_file_series(path) if len(files) == 1 else None
        except InputError as exc:
            self._error(str(exc))
            return
        full = Path(path).expanduser().absolute()  # "ct.nii.gz" typed in lits117's folder is lits117's
        if series is not None:
            await self._open_files(series, f"The DICOM series of '{path}'", case_title(str(full.parent)),
                                   case_stem(str(full.parent)), source=str(full.parent), series_of=str(full),
                                   whose=f"in the folder '{full.parent}'")
            return
        note = ""
        if len(files) > 1:  # a folder: its DICOM files are opened and the others named, as an upload's
            dicom, others = await self._split_dicom(files, f"Reading the {len(files)} files of '{path}' ...")
            if dicom:
                files, note = dicom, left_out_note(others)
        what = f"'{path}'" if len(files) == 1 else f"The folder '{path}'"
        await self._open_files(files, what, case_title(str(full)), case_stem(str(full)), source=str(full), note=note,
                               whose=f"in the folder '{path}'")

    async def _on_upload(self, files: list[dict], relative_path: str | None = None, field: str = "file",
                         relative_paths: list[str] | None = None) -> None:
        """Files the page uploaded; ``relative_path``: the first one's path in the folder the reader chose (the
        browser's ``webkitRelativePath``, "ct_dicom/CT.1.dcm"), whose folder names the exports; ``field``: the upload
        field they came from ("file" or "folder"); ``relative_paths``: every file's path in that folder (written
        there: files of one name in two of its subfolders are both kept).

        Several files chosen in the file field are a DICOM series as a folder's are; one .zip is unpacked and opened
        as the folder it holds; one DICOM slice alone (a browser sends no folder) is told how to upload its series."""
        if not files:
            return
        upload = field if field in UPLOAD_FIELDS else "file"
        folder = Path(tempfile.mkdtemp(prefix="upload-", dir=self._tmp.name))
        self._uploads_open.add(folder)
        chosen = str(relative_path or "").replace("\\", "/")
        chosen = chosen.split("/")[0] if "/" in chosen else ""  # the folder the reader chose
        subject = upload_subject(len(files), upload, chosen)
        try:
            await self._open_upload(files, folder, upload, chosen, subject, relative_paths)
        except Exception as exc:  # noqa: BLE001 - whatever went wrong, the reader is told and the upload's files go
            logger.exception("opening an upload failed")
            # (busy is not cleared here: it may be another open's; the steps of this upload that set it clear it)
            self._upload_refused(f"{subject} could not be opened on the app's machine ({type(exc).__name__}: {exc}); "
                                 "nothing of it was kept. Upload it again, or report this error with the app's log.",
                                 upload, folder)

    async def _open_upload(self, files: list[dict], folder: Path, upload: str, chosen: str, subject: str,
                           relative_paths: list[str] | None) -> None:
        """``_on_upload``'s work: the files written in ``folder`` and opened (``chosen``: the folder the reader
        chose, "" for files chosen; ``subject``: "The 3 files chosen")."""
        try:  # (more files than a folder typed may hold, or more bytes than the disk has free: nothing written)
            written = write_uploads(files, folder, relative_paths, subject)
        except InputError as exc:
            self._upload_refused(str(exc), upload, folder)
            return
        names = [Path(f).name for f in written]
        if len(written) == 1 and is_zip(written[0]):
            await self._open_zip(written[0], names[0], folder / "unpacked", upload, folder)
            return
        if len(written) == 1 and lone_dicom_slice(written[0]):
            folder_name = (chosen or "the folder chosen") if upload == "folder" else ""
            self._upload_refused(lone_slice_message(names[0], folder_name), upload, folder)
            return
        if len(written) == 1:  # the browser gives a file's name only, not its folder
            create_task(self._open_files(written, f"The uploaded file '{names[0]}'", names[0], case_stem(names[0]),
                                         source=f"uploaded file {names[0]}", upload=upload, upload_dir=folder))
            return
        if chosen:
            whose, where, source = f"of the uploaded folder '{chosen}'", f" in {chosen}", f"uploaded folder {chosen}"
        else:
            whose, where, source = "chosen", "", f"{len(names)} uploaded files"
        await self._open_several(written, whose, where, case_stem(chosen or "dicom-series"), source, upload, folder)

    def _on_too_many_files(self, count: int, relative_path: str | None = None, field: str = "file") -> None:
        """The page chose more files than an upload may hold: they were not sent (each is sent whole)."""
        upload = field if field in UPLOAD_FIELDS else "file"
        chosen = str(relative_path or "").replace("\\", "/")
        chosen = chosen.split("/")[0] if "/" in chosen else ""
        self._upload_refused(too_many_files_message(upload_subject(int(count), upload, chosen), int(count)), upload)

    async def _split_dicom(self, files: list[str], reading: str) -> tuple[list[str], list[str]]:
        """(the DICOM files, the others) of ``files``, read in a worker thread with ``reading`` on the status line
        (unless a step runs: the open that follows says to wait)."""
        idle = not (self.state.busy or self.state.job_running)
        shown = self.state.status
        if idle:
            self._set_busy(reading)
        try:
            return await asyncio.to_thread(split_dicom_files, files)
        finally:
            if idle:
                self._set_busy("")
                self.state.status = shown

    async def _open_several(self, files: list[str], whose: str, where: str, stem: str, source: str, upload: str,
                            upload_dir: Path | None) -> None:
        """Several uploaded files (chosen together, a folder's or a .zip's; ``whose``: "chosen", "of the uploaded
        folder 'x'"; ``where``: " in x" after the title's "20 DICOM files"): the DICOM ones opened as a series, the
        others named on the status line. None DICOM: what they are and what to do (several CT files: one at a time),
        but a MetaImage / detached NRRD header chosen with its data file opens. (All were "N DICOM files", and of
        several NIfTI files the largest opened, named so.)"""
        dicom, others = await self._split_dicom(files, f"Reading the {len(files)} files uploaded ...")
        if not dicom:
            header = single_image_header(files)
            if header is not None:  # ct.mhd chosen with its ct.raw: the header reads both
                name = Path(header).name
                create_task(self._open_files([header], f"The uploaded file '{name}'", name, case_stem(name),
                                             source=source, upload=upload, upload_dir=upload_dir))
                return
            self._upload_refused(no_dicom_message(f"The {len(files)} files {whose}", files), upload, upload_dir)
            return
        create_task(self._open_files(dicom, f"The {len(dicom)} DICOM files {whose}", f"{len(dicom)} DICOM files{where}",
                                     stem, source=source, upload=upload, upload_dir=upload_dir,
                                     note=left_out_note(others),
                                     whose="of the files chosen" if whose == "chosen" else whose))

    async def _open_zip(self, archive: str, name: str, into: Path, upload: str, upload_dir: Path | None = None) -> None:
        """An uploaded .zip: its files unpacked and opened as a folder (a DICOM series) or, one file, as that file.
        Not while a step runs (a propagation, another CT opening): the page is busy while it unpacks."""
        if self.state.busy or self.state.job_running:
            self._upload_refused("Wait for the current step to finish (or cancel the propagation) before opening a "
                                 "CT.", upload, upload_dir)
            return
        shown = self.state.status
        self._set_busy(f"Unpacking {name} ...")
        try:
            unpacked = await asyncio.to_thread(unpack_zip, archive, into, name)
        except InputError as exc:
            self._set_busy("")
            self.state.status = shown
            self._upload_refused(str(exc), upload, upload_dir)
            return
        except BaseException:  # (told by _on_upload; the busy this set is cleared, and only it)
            self._set_busy("")
            self.state.status = shown
            raise
        self._set_busy("")
        Path(archive).unlink(missing_ok=True)
        zip_stem = name[:-4] if name.lower().endswith(".zip") and len(name) > 4 else name
        if len(unpacked) == 1:
            inner = Path(unpacked[0]).name
            if lone_dicom_slice(unpacked[0]):
                self._upload_refused(f"The uploaded archive '{name}' holds one DICOM slice ('{inner}'), not a "
                                     "series: zip the whole folder of the series and upload that.", upload, upload_dir)
                return
            create_task(self._open_files(unpacked, f"'{inner}' in the uploaded archive '{name}'", f"{name}: {inner}",
                                         case_stem(inner), source=f"uploaded archive {name}", upload=upload,
                                         upload_dir=upload_dir))
            return
        await self._open_several(unpacked, f"in the uploaded archive '{name}'", f" in {name}", case_stem(zip_stem),
                                 f"uploaded archive {name}", upload, upload_dir)

    def _upload_refused(self, message: str, upload: str, upload_dir: Path | None = None) -> None:
        """An upload that opened nothing: the message; its field is emptied (the same files can be chosen again), and
        its files (``upload_dir``) removed."""
        self._error(message)
        with self.state:
            self.state.upload_keys = {field: key + (field == upload) for field, key in self.state.upload_keys.items()}
        if upload_dir is not None:
            self._uploads_open.discard(upload_dir)
            self._prune_uploads()

    def _prune_uploads(self) -> None:
        """Remove the uploads that are neither being opened nor the CT shown's (an upload is up to a whole series)."""
        keep = self._uploads_open | ({self._shown_upload} if self._shown_upload is not None else set())
        for listed in (self._shown_series, self._other_series):  # their series are listed, to open another
            if listed is not None and listed.upload_dir is not None:
                keep.add(listed.upload_dir)
        for folder in Path(self._tmp.name).glob("upload-*"):
            if folder not in keep:
                shutil.rmtree(folder, ignore_errors=True)

    async def _open_files(self, files: list[str], what: str, display_name: str, stem: str | None = None,
                          source: str = "", upload: str = "", series_of: str | None = None,
                          upload_dir: Path | None = None, note: str = "", whose: str = "") -> None:
        """Open a CT from ``files`` (one image file or a DICOM series); ``display_name`` names it on the page (its
        header, messages), ``stem`` its exports (default: after the file, or the files' folder); ``source``: where
        it came from (the header's tooltip); ``upload``: the upload field it came from ("" for a path); ``series_of``:
        the DICOM file typed, whose series among ``files`` is opened; ``note``: said on the status line once it opened
        (files of the upload left out); ``whose``: where the files are, to name another of their series ("of the
        uploaded folder 'cd'"), when they hold several.

        The upload fields show only the files of the CT shown: the others are emptied once a CT opens, and the field
        of an upload that opened nothing too (so that the same files can be chosen again: "upload it again")."""
        opened = False
        try:
            opened = await self._open_guarded(what, self._open_files_now(
                files, what, display_name, stem, source, series_of, bool(upload), note, whose=whose,
                upload_dir=upload_dir))
            if opened:
                self._shown_upload = upload_dir  # (None: a path opened, no upload is shown any more)
        finally:  # (whatever failed: the upload's folder is not kept as being opened for good)
            if upload_dir is not None:
                self._uploads_open.discard(upload_dir)
            if opened or upload_dir is not None:
                self._prune_uploads()
        keep = {upload} if opened else set()
        self._empty_upload_fields([field for field in UPLOAD_FIELDS
                                   if field not in keep and (opened or field == upload)])

    def _empty_upload_fields(self, fields: Sequence[str]) -> None:
        """The upload ``fields`` emptied on the page (a new key makes a new, empty, field)."""
        if fields:
            with self.state:
                self.state.upload_keys = {field: key + (field in fields)
                                          for field, key in self.state.upload_keys.items()}

    async def _open_guarded(self, what: str, opening) -> bool:
        """Await ``opening`` (an ``_open_files_now``): an unexpected error in it (a reader's RuntimeError, a
        MemoryError) is logged and told, the page no longer busy (it stayed busy for good, every later open refused
        "Wait for the current step", and nothing said); False then. The open cancelled (its task): the page freed
        too, then the cancellation goes on (``_open_files_now`` took away what the open had added)."""
        shown = self.state.status
        try:
            return await opening
        except asyncio.CancelledError:
            logger.info("opening %s was cancelled", what)
            self._not_opened(f"{what} was not opened: opening it was cancelled before it completed.", shown)
            raise
        except Exception as exc:  # noqa: BLE001 - whatever went wrong, the reader is told and the page is freed
            logger.exception("opening %s failed", what)
            self._not_opened(f"{what} could not be opened on the app's machine ({type(exc).__name__}: {exc}). Try "
                             "again, or report this error with the app's log.", shown)
            return False

    async def _open_files_now(self, files: list[str], what: str, display_name: str, stem: str | None,
                              source: str, series_of: str | None, uploaded: bool = False, note: str = "",
                              choices: tuple[SeriesChoice, ...] | None = None, chosen: SeriesChoice | None = None,
                              whose: str = "", again: str = "", upload_dir: Path | None = None) -> bool:
        """``_open_files`` without the upload fields: True when the CT opened. ``choices``: the DICOM series of
        ``files`` when known (else read from their headers here), ``chosen``: the one to open (else the first);
        ``again``: what to do to discard unexported work ("choose it again"); ``upload_dir``: the upload's folder.

        When the series tried of files holding several fails to open (not a CT in HU, unreadable, refused by the
        server), the message names that series and the files' series list stays on the page so that another can be
        chosen (it named the whole folder and showed no list: the reader had to upload the other series alone)."""
        stem_given, base_name = stem, display_name
        if chosen is not None:  # named as the series in every message ("8 DICOM files of series 2 'X' in cd")
            display_name = series_display_name(display_name, len(files), len(chosen.files), chosen.label)
        if stem is None:
            stem = case_stem(files[0] if len(files) == 1 else os.path.commonpath([str(Path(f).parent) for f in files]))
        if self.state.busy or self.state.job_running:
            self._error("Wait for the current step to finish (or cancel the propagation) before opening a CT.")
            return False
        shown = self.state.status  # the status line again when nothing opens (it said "Opening ..." behind the error)
        read_series = choices is None and chosen is None and len(files) > 1
        self._set_busy(f"Reading the DICOM series of {display_name} ..." if read_series
                       else f"Opening {display_name} ...")
        tried, read_what = chosen, what  # the series read, named in the messages when the files hold several
        try:
            if read_series:
                # the series from their headers, in a worker thread (the page stays live); only one is then read
                choices = tuple(await asyncio.to_thread(dicom_series_choices, files))
            if tried is None and choices is not None and len(choices) > 1:
                tried = pick_series(choices, what, series_of)  # the one load_ct_with_source reads
                read_what = f"{series_what(tried)} {whose or f'in {base_name}'}"
                # its own files counted ("Opening 24 DICOM files in cd" counted every series', a report's too)
                self._set_busy(f"Opening {series_display_name(display_name, len(files), len(tried.files), tried.label)}"
                               " ...")
            elif read_series:
                self._set_busy(f"Opening {display_name} ...")
            # read and checked before the open case's work is held back for: a file that is no CT (a missing path,
            # a text file, a 2D image, a folder with no series) gets its own message at once, not on a second press
            volume, dicom = load_ct_with_source(self.slicer_app, files, read_what, series_of, choices, chosen)
        except InputError as exc:
            hint, shown = self._keep_series_list(files, choices, tried, short_reason(str(exc), read_what),
                                                 whose or f"in {base_name}", base_name, stem_given, source, note,
                                                 uploaded, upload_dir, shown)
            self._not_opened(f"{exc}{hint}", shown)
            return False
        new = NewCase(volume)  # what this open adds: taken away again unless the open completes (all or nothing)
        try:
            # said once for this CT (for a series of the list: this series, not any of the same label) on this work;
            # of its content (another upload of the same folder name and series label is asked again), not of its
            # upload's folder (the same files uploaded again discard the work, as said)
            asked = ((what, chosen.key if chosen is not None else None,
                      self.workflow.change_marker() if self.workflow is not None else None,
                      content_key(chosen.files if chosen is not None else files, dicom))
                     if self._unexported_work() else None)
            if asked is not None and self._discard_asked != asked:
                # opening another CT drops this one's masks and undo steps: said once, then a second try goes on
                self._discard(new)
                self._discard_asked = asked
                # (a DICOM folder opened by its path was told to "upload it again")
                again = again or ("upload it again" if uploaded else "press Open again")
                self._not_opened(f"The segmentation of {self.state.ct_name} has changed since it was last exported, "
                                 f"and opening {display_name} drops it: export it first (section 6), or {again} to "
                                 "discard it.", shown)
                return False
            self._discard_asked = None
            try:
                # a sagittal / coronal CT is shown and segmented on its axial slices (its voxels reordered, none
                # resampled)
                reorientation = reorient_volume_to_axial(new.volume)
                new.content = SceneContent(self.slicer_app, new.volume, dicom, reorientation)
                geometry = server_geometry(new.content.ijk_to_ras)
                array = new.content.array
                info = await self._open_session(array, geometry)
            except (LiverSAMClientError, ValueError) as exc:
                self._discard(new)
                said = _client_message(exc).rstrip()
                # (only what depends on the files marks the series failed: the server unreachable for a moment, a
                # 5xx, a full server would not fail again once it answers, and its row stayed unclickable for good)
                of_files = _refused_for_the_files(exc)
                reason = f"the LiverSAM server refused it ({short_reason(said, '')})"
                hint, shown = self._keep_series_list(files, choices, tried, reason, whose or f"in {base_name}",
                                                     base_name, stem_given, source, note, uploaded, upload_dir, shown,
                                                     mark=of_files)
                said = said if not hint or said.endswith((".", "!", "?")) else said + "."
                self._not_opened(f"{read_what} was read, but the LiverSAM server "
                                 f"{'refused' if of_files else 'could not open'} it: {said}{hint}", shown)
                return False
            new.session = str(info["session_id"])
            workflow = Workflow(self.client, new.session, tuple(info["shape_kji"]),
                                reopen=self._reopen_session(new.content))

            def show() -> None:  # the page turned to the new case (its name, notes, exports and series list)
                nonlocal display_name, stem
                listed = dicom.series if dicom is not None else ()
                # (the series of these files that failed to open stay marked: they would fail again)
                failed = next((o.failed for o in (self._shown_series, self._other_series)
                               if o is not None and o.files == tuple(files)), {})
                self._shown_series = self._other_series = None  # (the other list goes once a CT opens)
                self._series_status = ""
                if len(listed) > 1:  # the reader can open another of the files' series from the page's list
                    self._shown_series = SeriesOrigin(tuple(files), tuple(listed), whose or f"in {base_name}",
                                                      base_name, stem_given, source, note, uploaded, upload_dir,
                                                      dict(failed))
                series = f"The DICOM series of {Path(series_of).name}, read from its folder. " if series_of else ""
                if dicom is not None and dicom.other_series:  # a CD-ROM export's folder: the reader is told which
                    if chosen is None:
                        display_name = series_display_name(display_name, len(files), dicom.num_files, dicom.label)
                    series += series_note(dicom, chosen is not None, series_of is not None)
                if len(listed) > 1 and dicom.chosen is not None:  # each series of the files: its own export names
                    stem = series_stem(stem, tuple(listed), dicom.chosen)
                self._show_new_case(display_name, stem, source or display_name, series + note)
                with self.state:
                    self._show_series_lists()

            self._make_shown(new, workflow, show)
            self._set_busy("")
            return True
        except BaseException:  # (a RuntimeError, a MemoryError: told by _open_guarded; the task cancelled: the
            # page freed there, the session a server call opens after all closed by _open_session)
            self._discard(new)
            raise

    async def _open_session(self, array: np.ndarray, geometry: ServerGeometry) -> dict:
        """The server's session of a new CT (``client.open_volume`` in a worker thread). When the open is cancelled
        while the server opens it, the worker thread goes on and the session it returns is closed once it comes (it
        was left open on the server, its id never known to ``_discard``)."""
        call = asyncio.ensure_future(asyncio.to_thread(
            self.client.open_volume, array, geometry.spacing, geometry.origin_lps, geometry.direction_lps))
        try:
            return await asyncio.shield(call)
        except asyncio.CancelledError:
            call.add_done_callback(self._close_late_session)
            raise

    def _close_late_session(self, call: asyncio.Future) -> None:
        """The session a cancelled open's server call returned after all (``_open_session``): closed again."""
        if call.cancelled() or call.exception() is not None:  # (no session was opened)
            return
        try:
            session = str(call.result()["session_id"])
        except Exception:  # noqa: BLE001 - an answer without a session: nothing to close
            return
        logger.info("closing the session %s of a CT whose open was cancelled", session)
        create_task(asyncio.to_thread(_close_session, self.client, session))

    def _make_shown(self, new: NewCase, workflow: Workflow, show: Callable[[], None]) -> None:
        """The new case (``new``, its ``workflow``) made the one shown, ``show`` turning the page to it; the case
        before is taken away last. When ``show`` raises, the case before is shown again as it was (the views turned
        back to it: they showed the new CT) and the error goes on to the caller, which takes the new case away."""
        old_content, old_workflow = self.content, self.workflow
        page = {key: self.state[key] for key in CASE_STATE}  # the page as it shows the case before
        series_before = (self._shown_series, self._other_series, self._series_status)
        self.content, self.workflow = new.content, workflow
        try:
            show()
        except BaseException:
            self.content, self.workflow = old_content, old_workflow
            self._shown_series, self._other_series, self._series_status = series_before
            self._show_again(old_content, page)
            raise
        new.committed = True
        if old_workflow is not None:
            create_task(asyncio.to_thread(old_workflow.close))
        if old_content is not None:
            try:
                old_content.remove()
            except Exception:  # noqa: BLE001 - the new case is open; the old one's nodes are only left over
                logger.exception("could not take the case before out of the scene")

    def _discard(self, new: NewCase) -> None:
        """Take away what an open that did not complete added: its CT and scene content, its server session."""
        if new.committed:
            return
        # each on its own: the segmentation failing to go left the CT in the scene too
        removals = [("scene content", new.content.remove)] if new.content is not None else []
        removals.append(("CT", lambda: remove_volume(self.slicer_app.scene, new.volume)))
        for what, remove in removals:
            try:
                remove()
            except Exception:  # noqa: BLE001 - the open's own error is what the reader is told
                logger.exception("could not take the %s of the CT that failed to open out of the scene", what)
        if new.session is not None:
            session, new.session = new.session, None
            create_task(asyncio.to_thread(_close_session, self.client, session))

    def _show_again(self, content: SceneContent | None, page: Mapping[str, Any]) -> None:
        """The page and the views back on ``content`` (the case before; None: no CT) as ``page`` had them, after
        showing a new case failed half way (the views, and maybe the page, showed the new CT).

        The page first, apart from the views: a view that cannot be turned back left the page showing the CT taken
        away (its name, slice count, export names, series lists) over the case before's work, whose export then took
        the new CT's file names. Each view step is tried on its own, so that one failing leaves the others done."""
        try:
            with self.state:
                self.state.update(dict(page))
        except Exception:  # noqa: BLE001 - the open's own error is what the reader is told
            logger.exception("could not show the page of the case before again")
        volume_id = content.volume.GetID() if content is not None else None
        steps: list[tuple[str, Callable[[], None]]] = []
        for view in self.slicer_app.view_manager.get_slice_views():
            steps += [("turn a slice view back", lambda view=view: view.set_background_volume_id(volume_id)),
                      ("reset a slice view", view.reset_view)]
        steps += [("reset a 3D view", view.reset_view) for view in self.slicer_app.view_manager.get_threed_views()]
        if content is not None:
            steps += [("set the window/level", lambda: content.set_window(float(page["window"]),
                                                                          float(page["level"]))),
                      ("show the slice", lambda: content.jump_to_slice(int(page["axial_k"])))]
        for what, step in steps:
            try:
                step()
            except Exception:  # noqa: BLE001 - the open's own error is what the reader is told
                logger.exception("could not %s of the case before again", what)

    def _keep_series_list(self, files: list[str], choices: tuple[SeriesChoice, ...] | None,
                          tried: SeriesChoice | None, reason: str, whose: str, display_name: str, stem: str | None,
                          source: str, note: str, uploaded: bool, upload_dir: Path | None,
                          status: str, mark: bool = True) -> tuple[str, str]:
        """After ``tried``, one series of ``files`` holding several, failed to open (``reason``, short): ``tried``
        marked in the files' series list (not offered again), which is the CT shown's list when they are the CT
        shown's files; else the files' list is shown beside it (the other list, kept with the upload's folder until
        a CT opens) when another of their series may be opened instead. Returns (the words that say so for the error,
        "" when there is none: the lists are left as they were; the status line ``status``, with whose files the
        other list shows: their upload field is emptied, yet they need not be uploaded again). ``mark``: False when
        ``tried`` may open once tried again (the server was unreachable): not marked."""
        if tried is None or not choices or len(choices) < 2:
            return "", status
        # (the CT shown's list stays, whatever files failed: its series can still be opened from it)
        origin = next((o for o in (self._shown_series, self._other_series) if o is not None
                       and o.files == tuple(files)), None)
        failed = {**(origin.failed if origin is not None else {}), **({tried.key: reason} if mark else {})}
        others = [c for c in choices if c.openable and c.key not in failed]
        if origin is None and not others:
            return "", status
        if origin is None:  # the files' list beside the CT shown's (it replaced it)
            origin = self._other_series = SeriesOrigin(tuple(files), tuple(choices), whose, display_name, stem,
                                                       source, note, uploaded, upload_dir)
            self._prune_uploads()  # (the folder of the other list before)
        origin.failed.clear()
        origin.failed.update(failed)
        with self.state:
            self._show_series_lists()
        if origin is self._other_series:  # the status line under the error says whose files it shows, kept
            again = "upload them" if uploaded else "open them"
            beside = " under the series of the CT shown" if self._shown_series is not None else ""
            words = (f"The {len(choices)} DICOM series {whose} are listed in section 1{beside}: their files are "
                     f"kept, click a series there to open it (no need to {again} again). ")
            status = status.removeprefix(self._series_status) if self._series_status else status
            self._series_status, status = words, words + status
        if not mark:
            return (f" It is one of the {len(choices)} DICOM series {whose}: click it in their list (section 1) to "
                    "try again once the server answers, or choose another series there.", status)
        if not others:
            return f" None of the other DICOM series {whose} can be opened.", status
        return (f" It is one of the {len(choices)} DICOM series {whose}: choose another series in their list "
                "(section 1) to open it instead.", status)

    def _show_series_lists(self) -> None:
        """The page's series lists and their captions (within ``with self.state``): the CT shown's files' series, its
        series shown marked; the other files' (``_keep_series_list``)."""
        shown_ct = self.state.ct_name if self.state.has_ct else ""
        chosen = self.content.dicom.chosen if self.content is not None and self.content.dicom is not None else None
        for origin, of_ct_shown, rows, caption in (
                (self._shown_series, True, "series_rows", "series_caption"),
                (self._other_series, False, "other_series_rows", "other_series_caption")):
            self.state[rows] = (series_rows(origin.choices, chosen if of_ct_shown else None, origin.failed)
                                if origin is not None else [])
            self.state[caption] = series_caption(origin, shown_ct, of_ct_shown) if origin is not None else ""

    def open_series(self, key: str | None = None, which: str = "shown", *_args) -> None:
        """Open another DICOM series of the files of a series list: ``which`` "shown", the CT shown's; "other", the
        files whose series tried could not be opened."""
        create_task(self._open_series(str(key), "other" if which == "other" else "shown"))

    async def _open_series(self, key: str, which: str = "shown") -> None:
        """The series ``key`` of the files of the list ``which`` ("shown": the CT shown's; "other"), opened as their
        first was (the same name, exports and notes), after the same unexported-work guard as any other CT ("choose it
        again in ... list" to discard the work)."""
        origin = self._shown_series if which == "shown" else self._other_series
        chosen = next((c for c in origin.choices if c.key == key), None) if origin is not None else None
        if origin is None or chosen is None:
            self._error("That series is not among the files listed any more: upload (or open) its files again.")
            return
        if not chosen.openable:
            self._error(f"{_first_upper(chosen.label)} cannot be opened as a CT: "
                        f"{chosen.why_not or 'it holds one image, no volume'}.")
            return
        if key in origin.failed:  # (its row is not clickable: it would fail again)
            listed = ("the series list of the CT shown" if which == "shown"
                      else f"the list of the DICOM series {origin.whose}")
            self._error(f"{_first_upper(chosen.label)} could not be opened: {origin.failed[key]}. Choose another "
                        f"series in {listed}.")
            return
        # (the other list's keys are its own: its "1" is not the series "1" of the CT shown)
        shown = (self.content.dicom.chosen if which == "shown" and self.content is not None
                 and self.content.dicom is not None else None)
        if shown is not None and shown.key == chosen.key:
            self._status(f"{_first_upper(chosen.label)} is the series shown.")
            return
        what = f"{series_what(chosen)} {origin.whose}"
        again = ("choose it again in the series list" if which == "shown" else
                 f"choose it again in the list of the DICOM series {origin.whose}")
        opened = await self._open_guarded(what, self._open_files_now(
            list(origin.files), what, origin.display_name, origin.stem, origin.source, None, origin.uploaded,
            origin.note, choices=origin.choices, chosen=chosen, whose=origin.whose, again=again,
            upload_dir=origin.upload_dir))
        if opened:  # (the other list's upload is the CT shown's now, or it goes with that list)
            self._shown_upload = origin.upload_dir
            self._prune_uploads()
            if which == "other":  # the CT before's upload is gone: its field showed it still (the other list's
                self._empty_upload_fields(UPLOAD_FIELDS)  # field was emptied when its series failed)

    def forget_other_series(self, *_args) -> None:
        """Close the other series list (files whose series tried could not be opened): an upload's files go."""
        if self._other_series is None:
            return
        if self.state.busy:  # (a series of it may be being opened from its files)
            self._error("Wait for the current step to finish before closing the list.")
            return
        self._other_series = None
        with self.state:
            if self._series_status and self.state.status.startswith(self._series_status):
                self.state.status = self.state.status.removeprefix(self._series_status)
            self._series_status = ""
            self._show_series_lists()
        self._prune_uploads()

    def _not_opened(self, message: str, status: str) -> None:
        """Nothing opened: the message, and the status line as it was before "Opening ..." (the open case's)."""
        with self.state:
            self.state.update({"busy": False, "busy_text": "", "status": status, "error": message})
        logger.info("user error: %s", message)

    def _reopen_session(self, content: SceneContent):
        """How the workflow opens its CT on the server again when the server lost the session (evicted as idle or
        least recently used, or the server restarted): the same voxels and geometry, so every mask still fits."""

        def reopen() -> str:
            geometry = server_geometry(content.ijk_to_ras)
            info = self.client.open_volume(content.array, geometry.spacing, geometry.origin_lps,
                                           geometry.direction_lps)
            logger.info("the server had lost the session: the CT is open again as %s", info["session_id"])
            return str(info["session_id"])

        return reopen

    def _show_new_case(self, display_name: str, stem: str = "ct", source: str = "", note_before: str = "") -> None:
        assert self.content is not None
        content = self.content
        for view in self.slicer_app.view_manager.get_slice_views():
            view.set_background_volume_id(content.volume.GetID())
            view.set_visible_in_3d(True)
            # back to the view's own orientation, then turned to the CT's voxel axes (as Slicer does when it shows
            # a volume): on a tilted (oblique) CT the red view then shows whole slices k, where prompts are drawn
            view.reset_view()
        for view in self.slicer_app.view_manager.get_threed_views():
            view.reset_view()
        content.set_window(400.0, 40.0)
        # the sliders follow a window/level dragged in a view (Browse mode). A method, not a lambda holding the node:
        # Python's garbage collector freed such a lambda (its only Python reference was the node's own observer), and
        # the next window/level change ran freed memory (the app died on a Browse drag after a collection).
        content.volume.GetDisplayNode().AddObserver(vtkCommand.ModifiedEvent, self._window_from_view)
        self._attach_prompting()
        if self._prompting is not None:
            self._prompting.forget_probe()  # the probe line is cleared below; the next mouse move fills it
        nk = content.shape_kji[0]
        self._jump(nk // 2)
        plane = slice_plane(content.ijk_to_ras)
        note = "Drag a box around the liver in the axial (red) view." if plane == "axial" else (
            f"Its slices are {plane}, not axial: LiverSAM prompts and propagates on axial slices, so it cannot "
            "segment this file. Resample it to axial slices (e.g. 3D Slicer's Resample Scalar Volume) and open that.")
        if content.reorientation is not None:
            note = (f"It is stored in {content.reorientation.input_plane} slices: shown and segmented on its axial "
                    "slices (its voxels reordered, none resampled); exports lie on the file's own grid. " + note)
        irregular = content.dicom.irregular if content.dicom is not None else ""
        if irregular:
            spacing = float(np.linalg.norm(content.ijk_to_ras[:3, 2]))
            note = (f"Its DICOM slices form no regular grid ({irregular.rstrip('.')}): they are shown and segmented "
                    f"interpolated onto a regular grid of {nk} slices {spacing:.2f} mm apart, as 3D Slicer does. A "
                    "DICOM SEG cannot reference slices the series does not have: export .seg.nrrd or a labelmap. "
                    + note)
        with self.state:
            self.state.update({
                "busy": False, "busy_text": "",  # with the status line: the page never shows "Opened" while busy
                "has_ct": True, "has_dicom": content.dicom is not None and not irregular,
                "dicom_note": DICOM_SEG_IRREGULAR if irregular else DICOM_SEG_NOTE, "ct_name": display_name, "n_slices": nk,
                "ct_source": source or display_name,
                "export_names": export_names(stem),
                "probe": "",  # the voxel under the mouse in the CT before (it showed "k 60 -876 HU" on a 3-slice CT)
                "window": 400.0, "level": 40.0,
                "review_rows": [], "review_items": [], "lesion_rows": [], "progress": 0, "propagated": [],
                "error": "",
                "status": f"Opened {display_name} ({content.shape_kji[2]} x {content.shape_kji[1]} x {nk}). "
                          f"{note_before}{note}",
            })
        self._sync_undo()

    def _attach_prompting(self) -> None:
        axial = self._axial_view()
        if axial is None:
            return
        if self._prompting is None:
            self._prompting = SlicePrompting(axial, self._on_box, self._on_point, self._on_probe,
                                             self._on_ignored_gesture)
            self._prompting.set_mode(self.state.mode)
            self._off_axial = [OffAxialGestures(view, self._on_off_axial_gesture)
                               for view in self.slicer_app.view_manager.get_slice_views() if view is not axial]
            self._on_mode_change(self.state.mode, self.state.segment)
        if self._axial_observer is None:
            node = axial.get_view_node()
            self._axial_observer = (node, node.AddObserver(vtkCommand.ModifiedEvent, self._on_axial_moved))

    def _axial_view(self):
        """The red view: axial in the layout (its slice node says "Reformat" once turned to a tilted CT's axes)."""
        views = list(self.slicer_app.view_manager.get_slice_views())
        for view in views:
            if getattr(getattr(view, "_view_properties", None), "orientation", None) == "Axial":
                return view
        return next((view for view in views if view.get_orientation() == "Axial"), None)

    def _set_busy(self, text: str) -> None:
        with self.state:
            self.state.busy = bool(text)
            self.state.busy_text = text
            if text:
                self.state.status = text
                self.state.error = ""

    # ================================================================== view state
    def _on_mode_change(self, mode: str, segment: str, **_kwargs) -> None:
        logger.debug("mode %s, segment %s", mode, segment)
        if self._prompting is not None:
            self._prompting.set_mode(mode)
        for watcher in self._off_axial:
            watcher.mode = mode
        set_window_level_drag(self.slicer_app.scene, mode == "navigate")
        hint = mode_hint(mode, segment)  # set here: the page shows it once the axial view has the mode
        if hint != self.state.mode_hint:
            with self.state:
                self.state.mode_hint = hint

    def _on_window_change(self, window: float, level: float, **_kwargs) -> None:
        if self.content is not None:
            self.content.set_window(float(window), float(level))

    def _window_from_view(self, display, _event=None) -> None:
        """The window/level of the CT's display node (dragged in a view) on the sliders (an observer of the node)."""
        if self.content is None or self.content.volume.GetDisplayNode() is not display:
            return
        window, level = round(display.GetWindow()), round(display.GetLevel())
        if (window, level) != (round(float(self.state.window)), round(float(self.state.level))):
            with self.state:
                self.state.update({"window": window, "level": level})

    def _current_k(self) -> int:
        axial = self._axial_view()
        if axial is None or self.content is None:
            return 0
        origin = axial.get_view_node().GetSliceToRAS()
        ras = [origin.GetElement(r, 3) for r in range(3)]
        return int(round(ras_to_ijk(self.content.ijk_to_ras, ras)[2]))

    def _on_axial_moved(self, *_args) -> None:
        if self.content is None:
            return
        k = self._current_k()
        if k != self.state.axial_k:
            with self.state:
                self.state.axial_k = k
            if self._prompting is not None:
                self._prompting.probe_again()  # the voxel under the mouse on the new slice
            create_task(self._prefetch_later(k))

    async def _prefetch_later(self, k: int) -> None:
        """Once the user stays on slice k, let the server encode it and its neighbours in the background."""
        await asyncio.sleep(PREFETCH_DELAY_S)
        workflow = self.workflow
        if workflow is None or self.state.job_running or self._current_k() != k:
            return
        if not 0 <= k < workflow.shape_kji[0]:
            return
        try:
            await asyncio.to_thread(self.client.prefetch, workflow.session_id, k, PREFETCH_RADIUS)
        except LiverSAMClientError as exc:  # only a speed-up: say nothing to the user
            logger.info("prefetch around slice %d failed: %s", k, exc)

    def _on_probe(self, ras: np.ndarray) -> None:
        if self.content is None:
            return
        i, j, k = np.round(ras_to_ijk(self.content.ijk_to_ras, ras)).astype(int)
        nk, nj, ni = self.content.shape_kji
        text = f"i {i}  j {j}  k {k}"
        if 0 <= i < ni and 0 <= j < nj and 0 <= k < nk:
            text += f"  {self.content.array[k, j, i]:g} HU"
        else:
            text += "  (outside the CT)"
        if text != self.state.probe:
            with self.state:
                self.state.probe = text

    def _on_probe_left(self, *_args) -> None:
        """The mouse left the axial view: no voxel is under it there (the probe kept its last place)."""
        if self._prompting is not None:
            self._prompting.mouse_left()
        if self.state.probe:
            with self.state:
                self.state.probe = ""

    def go_to_slice(self, value: Any = None, *_args) -> None:
        """Jump to the typed slice (the value comes with the event: the field's state may not be synced yet)."""
        if self.content is None:
            return
        try:
            k = int(float(value if value is not None else self.state.axial_k))
        except (TypeError, ValueError):
            self._error("The slice number must be a whole number.")
            return
        self._jump(int(np.clip(k, 0, self.content.shape_kji[0] - 1)))

    def jump_to_slice(self, k: int) -> None:
        if self.content is not None:
            self._jump(int(k))

    def _jump(self, k: int) -> None:
        assert self.content is not None
        self.content.jump_to_slice(k)
        with self.state:
            self.state.axial_k = k

    # ================================================================== prompts and live update
    def _prompt_refused(self, what: str) -> bool:
        """Say why a prompt cannot be taken now (True), or False when it can."""
        assert self.content is not None
        plane = slice_plane(self.content.ijk_to_ras)
        if plane != "axial":
            self._error(f"{what} ignored: the slices of {self.state.ct_name} are {plane}, not axial; LiverSAM prompts "
                        "and propagates on axial slices. Resample the CT to axial slices (e.g. 3D Slicer's Resample "
                        "Scalar Volume) and open that.")
            return True
        segment = self.state.segment
        if self.state.job_running and self._job_segment == segment:
            name = segment_word(segment)
            self._error(f"{what} ignored: the {name} is being propagated, and its result will replace the {name} "
                        f"mask. Wait for it to finish (or cancel it), then add {name} prompts.")
            return True
        return False

    def _on_box(self, ras_a: np.ndarray, ras_b: np.ndarray) -> None:
        if self.content is None or self.workflow is None:
            return
        if self._prompt_refused("Box"):
            return
        try:
            k, box = box_on_slice(self.content.ijk_to_ras, ras_a, ras_b, self.content.shape_kji)
        except PromptOutsideVolume as exc:
            self._error(f"Box ignored: {exc}.")
            return
        segment = self.state.segment
        logger.debug("%s box on slice %d: %s", segment, k, box)
        change = self.workflow.push_undo(f"{segment_word(segment)} box on slice {k}")
        self.workflow.add_box(segment, k, box)
        create_task(self._predict(segment, k, change, ("box", box)))

    def _on_point(self, ras: np.ndarray, positive: bool) -> None:
        if self.content is None or self.workflow is None:
            return
        if self._prompt_refused("Point"):
            return
        try:
            k, point = point_on_volume(self.content.ijk_to_ras, ras, self.content.shape_kji)
        except PromptOutsideVolume as exc:
            self._error(f"Point ignored: {exc}.")
            return
        segment = self.state.segment
        prompts = self.workflow.prompts[segment].get(k)
        if (prompts is None or prompts.empty()) and self.workflow.masks[segment][k].any():
            self._edit_propagated_slice(segment, k, point, positive)
            return
        if segment == "tumor" and not (prompts and prompts.boxes):
            self._error("Point ignored: a tumour point refines a lesion box; draw the box around the lesion first.")
            return
        if not positive and not (prompts and (prompts.boxes or prompts.points)):
            self._error(f"Point ignored: a - point corrects a mask; on slice {k} there is none yet. Draw a box "
                        f"around the {segment_word(segment)} or click a + point on it first.")
            return
        logger.debug("%s %s point on slice %d: %s", segment, "+" if positive else "-", k, point)
        change = self.workflow.push_undo(f"{'+' if positive else '-'} point on slice {k}")
        self.workflow.add_point(segment, k, point, positive)
        create_task(self._predict(segment, k, change, ("point+" if positive else "point-", point)))

    def _on_ignored_gesture(self, what: str, distance: int) -> None:
        """A gesture in the axial view that made no prompt (``SlicePrompting.on_ignored``): say why."""
        if self.content is None:
            return
        name = {"tumor": "lesion"}.get(self.state.segment, "liver")
        if what == "box-click":
            gesture = ("a click draws no box" if distance == 0 else
                       f"the mouse moved only {distance} px between press and release, too little for a box")
            self._error(f"Box ignored: {gesture}. Press, drag across the {name} and release (to click points, "
                        "choose + or -).")
        else:
            self._error(f"Point ignored: the mouse moved {distance} px between press and release (a click may move "
                        f"{CLICK_TOLERANCE_PX} px at most). Click again without moving the mouse (to draw a box, "
                        "choose Box).")

    def _on_off_axial_gesture(self, view_label: str) -> None:
        """A press and release in the coronal or sagittal view in a prompt mode: prompts go in the axial view."""
        if self.content is None:
            return
        what = "Box" if self.state.mode == "box" else "Point"
        self._error(f"{what} ignored: boxes and points are drawn in the axial (red) view, on one axial slice; the "
                    f"{view_label} view only shows them. Go to the slice in the red view (wheel, slider or Axial "
                    "slice k) and draw it there. To drag window/level, choose Browse.")

    def _unexported_work(self) -> bool:
        """True when the open CT has masks that changed since they were last exported."""
        workflow = self.workflow
        if workflow is None or not any(mask.any() for mask in workflow.masks.values()):
            return False
        return workflow.change_marker() is not self._exported_at

    def _edit_propagated_slice(self, segment: str, k: int, point: tuple[float, float], positive: bool) -> None:
        """A + / - point on a slice the propagation segmented: its 3 mm disk edits the mask shown (Workflow.edit_slice)."""
        workflow, content = self.workflow, self.content
        assert workflow is not None and content is not None
        spacing = tuple(float(np.linalg.norm(content.ijk_to_ras[:3, axis])) for axis in (0, 1))
        before = int(workflow.masks[segment][k].sum())
        change = workflow.push_undo(f"{'+' if positive else '-'} point on slice {k}")
        area = int(workflow.edit_slice(segment, k, point, positive, spacing).sum())
        if area == before:  # the click was on what the mask already holds (+) or leaves out (-): nothing to undo
            workflow.withdraw(change, segment, k, None)
        content.show_mask(segment, workflow.masks[segment])
        self._refresh_all()
        label = "Liver" if segment == "liver" else "Tumour"
        self._status(f"{label} on slice {k}: {area} voxels ({area - before:+d}: the point's 3 mm disk "
                     f"{'joined' if positive else 'erased'} where you clicked; the propagated mask stays elsewhere).")

    async def _predict(self, segment: str, k: int, change=None, prompt: tuple | None = None) -> None:
        workflow = self.workflow
        assert workflow is not None and self.content is not None
        self._refresh_prompts()
        logger.debug("live update of %s slice %d: waiting for the previous one", segment, k)
        async with self._predict_lock:
            if workflow is not self.workflow:
                return
            logger.debug("live update of %s slice %d: asking the server", segment, k)
            with self.state:
                self.state.busy = True
                self.state.status = f"Segmenting the {segment_word(segment)} on slice {k} ..."
            started = time.monotonic()
            try:
                await asyncio.to_thread(workflow.predict_slice, segment, k)
            except LiverSAMClientError as exc:
                # take back this prompt only (another change may have come since: it stays)
                workflow.withdraw(change, segment, k, prompt)
                if workflow is self.workflow:
                    self._refresh_all()
                    self._error(f"The server could not segment slice {k}, so the prompt was taken back: "
                                f"{_client_message(exc)}{_what_to_do(exc)}")
                return
            finally:
                with self.state:
                    self.state.busy = False
            if workflow is not self.workflow:
                return
            self.content.show_mask(segment, workflow.masks[segment])
            area = int(workflow.masks[segment][k].sum())
            logger.debug("live update of %s slice %d: %d voxels", segment, k, area)
            why = _empty_tumour_reason(workflow, k) if segment == "tumor" and area == 0 else ""
            if why:
                self._error(f"Tumour on slice {k}: 0 voxels. {why}; undo takes this tumour box back.")
                self._sync_undo()
                return
            self._status(f"{segment_word(segment).capitalize()} on slice {k}: {area} voxels ({time.monotonic() - started:.1f} s). "
                         "Add + / - points to correct it, or propagate." + _no_liver_note(workflow, segment))
            self._sync_undo()

    def clear_slice(self, segment: str | None = None, *_args) -> None:
        """Clear the shown segment (sent with the click, as for ``propagate``) on the slice shown."""
        if self.workflow is None or self.content is None:
            return
        k, segment = self._current_k(), self._segment(segment)
        if self.state.job_running and self._job_segment == segment:
            name = segment_word(segment)
            self._error(f"Not cleared: the {name} is being propagated, and its result will replace the {name} mask. "
                        "Wait for it to finish (or cancel it), then clear the slice.")
            return
        self.workflow.push_undo(f"clear {segment_word(segment)} on slice {k}")
        self.workflow.clear_slice(segment, k)
        self._refresh_all()
        self._status(f"Cleared the {segment_word(segment)} prompts and mask on slice {k}.")

    def undo(self, *_args) -> None:
        if self.workflow is None:
            return
        label = self.workflow.undo()
        if not label:
            self._error("Nothing to undo.")
            return
        self._refresh_all()
        self._show_tables(None)
        self._status(f"Undone: {label}.")

    def _refresh_prompts(self) -> None:
        if self.content is not None and self.workflow is not None:
            self.content.show_prompts(self.workflow.prompts)
        self._sync_undo()

    def _refresh_all(self) -> None:
        if self.content is None or self.workflow is None:
            return
        for segment, mask in self.workflow.masks.items():
            self.content.show_mask(segment, mask, surface=segment in self.workflow.propagated)
        self._refresh_prompts()

    def _sync_undo(self) -> None:
        workflow = self.workflow
        with self.state:
            self.state.can_undo = bool(workflow and workflow.can_undo())
            self.state.undo_label = workflow.undo_label() if workflow else ""

    # ================================================================== propagation jobs
    # A trigger that awaits a whole job would hold back the page's next events (Cancel included): the job
    # runs as a task of its own and the trigger returns at once.
    #
    # The page sends the segment and the settings it shows with the click. trame's client holds a state change back
    # while any call to the server is pending (a view's mouse events, a render) and sends a click at once: a checkbox
    # ticked just before the click reached the server after it, and "Faster on thin slices" was off for that job
    # (the TotalSegmentator DICOM series: 20 slices of 2 mm, none interpolated).
    def propagate(self, segment: str | None = None, fast_thin: bool | None = None, tumour_ring: bool | None = None,
                  *_args) -> None:
        settings = {"fast_thin": bool(self.state.fast_thin if fast_thin is None else fast_thin),
                    "tumour_ring": bool(self.state.tumour_ring if tumour_ring is None else tumour_ring)}
        create_task(self._run_job(self._segment(segment), repropagate_k=None, settings=settings))

    def repropagate(self, segment: str | None = None, *_args) -> None:
        create_task(self._run_job(self._segment(segment), repropagate_k=self._current_k()))

    def _segment(self, sent: str | None) -> str:
        """The segment a click sent (the one its button showed), else the state's."""
        return sent if sent in SEGMENTS else str(self.state.segment)

    async def _run_job(self, segment: str, repropagate_k: int | None, settings: dict[str, bool] | None = None) -> None:
        workflow = self.workflow
        if workflow is None or self.state.job_running:
            return
        self._cancel_requested = False
        self._job_segment = segment
        with self.state:
            self.state.job_running = True  # at once: a second click does not start a second job
        try:
            await self._start_and_follow_job(workflow, segment, repropagate_k, settings or {})
        finally:
            self.job_id = None
            with self.state:
                self.state.job_running = False

    async def _start_and_follow_job(self, workflow: Workflow, segment: str, repropagate_k: int | None,
                                    settings: dict[str, bool]) -> None:
        async with self._predict_lock:  # the last live update goes first
            pass
        try:
            if repropagate_k is None:
                job = await asyncio.to_thread(workflow.start_propagation, segment, settings.get("fast_thin", False),
                                              settings.get("tumour_ring", True))
                what = f"Propagating the {segment_word(segment)}"
            else:
                job = await asyncio.to_thread(workflow.start_repropagation, segment, repropagate_k)
                what = f"Re-propagating the {segment_word(segment)} from slice {repropagate_k}"
        except ValueError as exc:
            self._error(f"{exc}.")
            return
        except LiverSAMClientError as exc:
            self._error(f"The server could not start the job: {_client_message(exc)}{_what_to_do(exc)}")
            return
        self.job_id, self._job_segment = job, segment
        if self._cancel_requested:
            await self.cancel_job()
        with self.state:
            self.state.update({"progress": 0, "error": "", "status": f"{what} ..."})
        try:
            status = await self._poll_job(workflow, job, what)
            logger.info("job %s (%s) ended: %s", job, what, status["state"])
            if status["state"] == "done":
                result = await asyncio.to_thread(workflow.apply_result, job, segment)
                if workflow is self.workflow:
                    self._show_result(segment, result)
            elif status["state"] == "cancelled":
                self._status(f"{what}: cancelled; nothing changed.")
            else:
                self._error(f"{what} failed on the server: {status.get('error') or status['state']}. Nothing changed.")
        except LiverSAMClientError as exc:
            self._error(f"{what} failed: {_client_message(exc)}. Nothing changed: your prompts and masks are as "
                        f"they were{_what_to_do(exc, job=True)}")

    async def _poll_job(self, workflow: Workflow, job: str, what: str) -> dict:
        """Poll the job until it ends; its count goes to the status line (at the top of the panel, with the bar and
        Cancel) unless another message has replaced the job's there (a live update of the other segment)."""
        shown = self.state.status
        while True:
            status = await asyncio.to_thread(workflow.job_status, job)
            done, total = int(status.get("done") or 0), int(status.get("total") or 0)
            if status["state"] in ("done", "failed", "cancelled"):
                return status  # the caller's status line says how it ended
            stage = status.get("stage") or status["state"]
            with self.state:
                self.state.progress = round(100.0 * done / total) if total else 0
                if self.state.status == shown:
                    shown = self.state.status = f"{what}: {stage} {done}/{total}" if total else f"{what}: {stage} ..."
            await asyncio.sleep(JOB_POLL_S)

    async def cancel_job(self, *_args) -> None:
        logger.info("cancel asked for job %s", self.job_id)
        if self.state.job_running and not self.job_id:
            self._cancel_requested = True  # the job is being started: cancel it as soon as it has an id
            return
        if self.job_id and self.workflow is not None:
            try:
                status = await asyncio.to_thread(self.workflow.cancel, self.job_id)
                logger.info("job %s after cancel: %s", self.job_id, status.get("state"))
            except LiverSAMClientError as exc:
                self._error(f"Cancel failed: {_client_message(exc)}")

    def _show_result(self, segment: str, result: dict) -> None:
        assert self.workflow is not None and self.content is not None
        self.content.show_mask(segment, self.workflow.masks[segment], surface=True)
        if segment == "tumor":  # the liver takes the tumour's voxels that a past-organ rule placed outside it
            self.content.show_mask("liver", self.workflow.masks["liver"], surface="liver" in self.workflow.propagated)
        report = self.workflow.review.get(segment, {})
        voxels = int(self.workflow.masks[segment].sum())
        self._show_tables(segment)
        with self.state:
            self.state.progress = 100
            flagged = len(report.get("flagged_slices", []))
            ml = report.get("volume_ml")
            volume = f"{float(ml):.1f} mL" if isinstance(ml, (int, float)) else "? mL"
            self.state.status = (f"{segment_word(segment).capitalize()}: {voxels} voxels, {volume}; {flagged} "
                                 f"slice{'' if flagged == 1 else 's'} flagged for review. Fix a slice with points or "
                                 "a box, then re-propagate from it." + _no_liver_note(self.workflow, segment))
            self.state.error = ""
        self._sync_undo()

    def _show_tables(self, segment: str | None) -> None:
        """The review list of ``segment`` (None: the last one shown, if it is still propagated), the lesions."""
        assert self.workflow is not None
        segment = segment or self.state.review_segment
        if segment not in self.workflow.propagated:
            segment = next(iter(sorted(self.workflow.propagated)), "")
        report = self.workflow.review.get(segment, {}) if segment else {}
        lesions = self.workflow.lesions if "tumor" in self.workflow.propagated else []
        with self.state:
            self.state.review_segment = segment
            # The review items (ranges of flagged slices with their reason, at most ten per scan) of every
            # propagated segment, in the report's order.
            self.state.review_items = review_items(self.workflow.review, self.workflow.propagated)
            self.state.review_rows = review_rows(report)
            self.state.lesion_rows = lesion_rows(lesions)
            self.state.propagated = sorted(self.workflow.propagated)

    # ================================================================== export
    async def export(self, kind: str) -> Any:
        if self.content is None or self.workflow is None:
            self._error("Open a CT and segment it before exporting.")
            return None
        if not any(mask.any() for mask in self.workflow.masks.values()):
            # an empty file downloaded without a word looks like a result; the DICOM SEG writer refuses it anyway
            self._error("Nothing to export yet: no liver or tumour voxel is segmented. Drag a box around the liver in "
                        "the axial (red) view (and propagate it), then export.")
            return None
        folder = Path(tempfile.mkdtemp(dir=self._tmp.name))
        try:
            if kind == "segnrrd":
                path = folder / self.state.export_names[kind]
                self.content.write_segmentation(path)
            elif kind == "labelmap":
                path = folder / self.state.export_names[kind]
                self.content.write_labelmap(self.workflow.labelmap(), path)
            elif kind == "dicomseg":
                path = folder / self.state.export_names[kind]
                if not await self._export_dicom_seg(path):
                    return None
            else:
                self._error(f"Unknown export '{kind}'.")
                return None
            data = path.read_bytes()
        except OSError as exc:
            self._error(f"Export failed: {exc}")
            return None
        self._exported_at = self.workflow.change_marker()
        self._status(f"Exported {path.name} ({len(data) // 1024} KB).")
        return self.server.protocol.addAttachment(data)


    async def _export_dicom_seg(self, path: Path) -> bool:
        """The server writes the SEG (liversam.dicom_seg) from the masks as the page shows them."""
        content, workflow = self.content, self.workflow
        assert content is not None and workflow is not None
        if content.dicom is None:
            self._error(f"DICOM SEG needs a CT opened from a DICOM series; {self.state.ct_name} is not one. "
                        "Export .seg.nrrd or the labelmap instead.")
            return False
        if content.dicom.irregular:
            self._error(f"{DICOM_SEG_IRREGULAR} ({content.dicom.irregular.rstrip('.')})")
            return False
        if not any(mask.any() for mask in workflow.masks.values()):
            self._error("Nothing to export yet: segment the liver (or a tumour) first.")
            return False
        # A series stored in sagittal or coronal slices: the session (and the masks) hold its axial slices; the
        # server's writer puts them back on the series' own frames (liversam.dicom_seg.on_series_grid).
        dicom = content.dicom

        def write_once() -> bytes:
            uploaded = []
            try:
                for segment, mask in workflow.masks.items():
                    workflow.client.upload_mask(workflow.session_id, f"export_{segment}", mask)
                    uploaded.append(f"export_{segment}")
                return workflow.client.export_dicom_seg(
                    workflow.session_id, [(segment, f"export_{segment}") for segment in workflow.masks],
                    reference_dicom=dicom.folder, series_uid=dicom.series_uid or None)
            finally:  # the copies sent for the export are not kept on the server (a shared server's memory)
                for name in uploaded:
                    try:
                        workflow.client.delete_mask(workflow.session_id, name)
                    except LiverSAMClientError as exc:  # the export's own outcome is what the user is told
                        logger.info("could not forget %s on the server: %s", name, exc)

        def write() -> bytes:
            return workflow.with_session(write_once)

        self._set_busy("Writing the DICOM SEG ...")
        try:
            data = await asyncio.to_thread(write)
        except LiverSAMClientError as exc:
            advice, message = _what_to_do(exc), _client_message(exc)
            if Path(dicom.folder).is_relative_to(self._tmp.name):  # an upload: not by the temporary folder's name
                message = message.replace(f"'{dicom.folder}'", "the uploaded folder").replace(dicom.folder,
                                                                                              "the uploaded folder")
            if content.reorientation is not None and "does not match the DICOM series" in message:
                # a server older than the page: it cannot put axial masks on a sagittal / coronal series' frames
                advice = (f". This LiverSAM server cannot write a DICOM SEG of a series stored in "
                          f"{content.reorientation.input_plane} slices (update it); meanwhile export .seg.nrrd (on the "
                          f"series' own grid) and run: liversam export {self.state.export_names['segnrrd']} "
                          f"--reference-dicom SERIES_FOLDER --output {self.state.export_names['dicomseg']}")
            self._error(f"DICOM SEG export failed: {message.rstrip('.')}{advice}")
            return False
        finally:
            self._set_busy("")
        path.write_bytes(data)
        return True


def mode_hint(mode: str, segment: str) -> str:
    """What the mouse does in the axial view now."""
    if mode == "box":
        if segment == "tumor":
            return ("Tumour box: press, drag and release around one lesion (each box is one more lesion; tumours "
                    "are kept inside the liver).")
        return "Liver box: press, drag and release around the liver on this slice (a new box replaces it)."
    name = {"tumor": "tumour"}.get(segment, segment)
    if mode == "point+":
        return f"+ point: click on {name} that the mask misses; the slice is segmented again."
    if mode == "point-":
        return f"- point: click where the {name} mask spills over; the slice is segmented again."
    return ("Browse: drag in a slice view for window/level (left-right: window, up-down: level; a double-click "
            "resets it), the wheel scrolls slices.")


def _empty_tumour_reason(workflow: Workflow, k: int) -> str:
    """Why a tumour box on slice k gave no voxel, when the liver explains it ("" when it does not)."""
    liver = workflow.masks["liver"]
    if not liver.any():
        return ""
    if not liver[k].any():
        return (f"Tumours are kept inside the liver, and the liver has no mask on slice {k} yet: propagate the liver "
                "(or draw a liver box on this slice) first")
    if workflow.dropped_outside_liver:
        return (f"The model's mask for this box ({workflow.dropped_outside_liver} voxels) lies outside the liver mask, "
                "and tumours are kept inside the liver: draw the box on a lesion inside the liver, or correct the "
                "liver on this slice first")
    return "The model found no lesion in this box: draw it closely around a lesion"


def _no_liver_note(workflow: Workflow | None, segment: str) -> str:
    """For a tumour with no liver segmented yet: it is not kept inside one (it ran over 96 slices of lits117)."""
    if segment != "tumor" or workflow is None or workflow.masks["liver"].any():
        return ""
    return (" No liver is segmented yet, so this tumour is not kept inside one: segment and propagate the liver first "
            "(tumours are kept inside the liver), then the tumours.")


def _client_message(exc: Exception) -> str:
    if isinstance(exc, ServerRequestError):
        return exc.message
    return str(exc)


def content_key(files: Sequence[str], dicom: DicomSource | None) -> tuple:
    """What tells a CT's content from another's of the same name without reading it again: its DICOM series' UID
    (``dicom``), and its files' names and sizes (not their folder: an upload's is new each time)."""
    def size(path: str) -> int:
        try:
            return os.stat(path).st_size
        except OSError:
            return -1

    return (dicom.series_uid if dicom is not None else None, tuple(sorted((Path(f).name, size(f)) for f in files)))


def _close_session(client: LiverSAMClient, session: str) -> None:
    """Close a server session of a CT that did not open (best effort: the server closes idle sessions anyway)."""
    try:
        client.close_session(session)
    except Exception as exc:  # noqa: BLE001
        logger.info("could not close the session %s of a CT that did not open: %s", session, exc)


def _refused_for_the_files(exc: Exception) -> bool:
    """True when the server's refusal of a CT depends on its voxels or geometry (a 4xx about the volume, a
    ValueError of its geometry): it would fail again. False for what may pass once retried: the server unreachable, a
    5xx (its session limit), a request aborted, a token refused, a busy server (408, 409, 429)."""
    if isinstance(exc, ValueError):
        return True
    return (isinstance(exc, ServerRequestError) and 400 <= exc.status < 500
            and exc.status not in (401, 403, 404, 408, 409, 429))


def _what_to_do(exc: Exception, job: bool = False) -> str:
    """What the user can do after a failed server call (the page keeps every prompt and mask)."""
    if isinstance(exc, ServerUnavailable):
        return (". The page keeps your prompts and masks: when the LiverSAM server is running again, repeat the step"
                " (or export what you have now with .seg.nrrd / Labelmap).")
    if job and isinstance(exc, ServerRequestError) and exc.status == 404:
        return ". The server no longer has this job (it was restarted, or the job was forgotten): propagate again."
    return "."
