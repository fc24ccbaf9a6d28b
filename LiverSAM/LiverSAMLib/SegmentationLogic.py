"""LiverSAM's Slicer logic: segments, writing masks the Segment Editor way, undo, results, export.

MRML only (no Qt): every method takes nodes, returns nodes / arrays, or raises a
:class:`liversam.errors.LiverSAMError`. The model runs in the LiverSAM server; this module writes what it
returns.

Writing into a segment goes through :class:`slicer.vtkSlicerSegmentEditorLogic` (Slicer >= 5.10) bound to
LiverSAM's *own* ``vtkMRMLSegmentEditorNode`` (hidden, not saved), so a write never changes which
segmentation or source volume the Segment Editor module shows. Before each write the user's Segment Editor
settings are copied onto it: the overwrite mode always, the editable area (mask mode / mask segment) and
the editable intensity range when the Segment Editor is editing the same segmentation.

Segments that contain others are never allowed to erase them: a write into ``liver`` keeps every voxel
of the other segments (tumours) whatever the overwrite mode says, and a tumour write keeps the liver.

Undo: every user action is one undo state. Live updates (a prompt moved, a point added) on the same
slice of the same segment pass the same ``undo_key`` and share the first one's state, so the user's manual
edits do not fall out of the history. When the Segment Editor module is editing the same segmentation the
widget passes the Segment Editor widget's ``saveStateForUndo`` / ``undo`` / ``redo`` slots, so LiverSAM's
writes and Paint / Erase strokes go into one history; otherwise the logic keeps its own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import slicer

from liversam.errors import InputImageError, OutputError

from . import MRMLBridge

LIVER = "liver"
TUMOR = "tumor"
STANDARD_SEGMENTS = (LIVER, TUMOR)

# Segment Editor parameter node of the Segment Editor module (its singleton tag in the scene), whose
# settings LiverSAM follows, and LiverSAM's own node, which its writes use.
SEGMENT_EDITOR_SINGLETON_TAG = "SegmentEditor"
LIVERSAM_EDITOR_SINGLETON_TAG = "LiverSAM.SegmentEditor"

# The undo callbacks the widget installs: the Segment Editor widget's ``saveStateForUndo``, ``undo`` and
# ``redo`` slots, so that Ctrl+Z undoes LiverSAM's writes together with manual edits.
SaveStateForUndo = Callable[[], object]
UndoCallback = Callable[[], object]

logger = logging.getLogger(__name__)


class SegmentationLogic:
    """Segments, Segment-Editor-consistent writes and exports for one scene.

    ``editor_node`` is the ``vtkMRMLSegmentEditorNode`` whose masking and overwrite settings apply; by
    default the Segment Editor module's node in the scene (created if the scene has none yet).
    ``save_state_for_undo`` (with ``undo_shared`` / ``redo_shared``) replaces the logic's own undo history
    by a shared one, e.g. the Segment Editor widget's (see the module docstring).
    """

    def __init__(
        self,
        scene=None,
        editor_node=None,
        save_state_for_undo: SaveStateForUndo | None = None,
        undo_shared: UndoCallback | None = None,
        redo_shared: UndoCallback | None = None,
    ) -> None:
        self._scene = scene
        self._editor_node = editor_node
        self.save_state_for_undo = save_state_for_undo
        self.undo_shared = undo_shared
        self.redo_shared = redo_shared
        self._editor_logic = None
        self._last_undo_key: Hashable | None = None
        self._last_history = "own"
        self.maximum_undo_states = 10

    # --- scene, editor node and editor logic -------------------------------------------------------
    @property
    def scene(self):
        return self._scene or slicer.mrmlScene

    def editor_node(self) -> slicer.vtkMRMLSegmentEditorNode:
        """LiverSAM's own Segment Editor node (hidden, not saved with the scene), created when missing."""
        node = self._editor_node
        if node is not None and node.GetScene() is self.scene:
            return node
        node = self.scene.GetSingletonNode(LIVERSAM_EDITOR_SINGLETON_TAG, "vtkMRMLSegmentEditorNode")
        if node is None:
            node = self.scene.CreateNodeByClass("vtkMRMLSegmentEditorNode")
            node.UnRegister(None)
            node.SetSingletonTag(LIVERSAM_EDITOR_SINGLETON_TAG)
            node.SetHideFromEditors(True)
            node.SetSaveWithScene(False)
            node = self.scene.AddNode(node)
        self._editor_node = node
        self._editor_logic = None  # bound to a node of a previous scene
        return node

    def shared_editor_node(self) -> slicer.vtkMRMLSegmentEditorNode | None:
        """The Segment Editor module's node (None when the scene has none yet); LiverSAM never modifies it."""
        return self.scene.GetSingletonNode(SEGMENT_EDITOR_SINGLETON_TAG, "vtkMRMLSegmentEditorNode")

    def shared_editor_edits(self, segmentation_node: slicer.vtkMRMLSegmentationNode) -> bool:
        """True when the Segment Editor module is editing ``segmentation_node`` (then undo is shared)."""
        shared = self.shared_editor_node()
        return shared is not None and shared.GetSegmentationNode() is segmentation_node

    def _copy_user_settings(self, segmentation_node: slicer.vtkMRMLSegmentationNode) -> None:
        """The user's Segment Editor settings onto LiverSAM's node (see the module docstring)."""
        own, shared = self.editor_node(), self.shared_editor_node()
        if shared is None:
            return
        own.SetOverwriteMode(shared.GetOverwriteMode())
        same = shared.GetSegmentationNode() is segmentation_node
        own.SetMaskMode(shared.GetMaskMode() if same else slicer.vtkMRMLSegmentationNode.EditAllowedEverywhere)
        own.SetMaskSegmentID(shared.GetMaskSegmentID() if same else None)
        own.SetSourceVolumeIntensityMask(bool(same and shared.GetSourceVolumeIntensityMask()))
        if same:
            own.SetSourceVolumeIntensityMaskRange(*shared.GetSourceVolumeIntensityMaskRange())

    def editor_logic(self, segmentation_node, volume_node) -> slicer.vtkSlicerSegmentEditorLogic:
        """A ``vtkSlicerSegmentEditorLogic`` on LiverSAM's editor node, bound to the segmentation and volume."""
        node = self.editor_node()
        if self._editor_logic is None:
            logic = slicer.vtkSlicerSegmentEditorLogic()
            logic.SetMRMLScene(self.scene)
            logic.SetMaximumNumberOfUndoStates(self.maximum_undo_states)
            self._editor_logic = logic
        logic = self._editor_logic
        if logic.GetSegmentEditorNode() is not node:
            logic.SetSegmentEditorNode(node)
        if logic.GetSegmentationNode() is not segmentation_node:
            logic.SetSegmentationNode(segmentation_node)
        if logic.GetSourceVolumeNode() is not volume_node:
            logic.SetSourceVolumeNode(volume_node)
        return logic

    def protected_segments(self, segmentation_node, segment_id: str) -> list[str]:
        """Segments a write into ``segment_id`` must keep: a ``liver`` write keeps every other segment
        (the tumours inside it); other writes keep the liver."""
        segmentation = segmentation_node.GetSegmentation()
        segment = segmentation.GetSegment(segment_id)
        if segment is None:
            return []
        ids = [segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments())]
        if segment.GetName().lower() == LIVER:
            return [sid for sid in ids if sid != segment_id]
        liver = segmentation.GetSegmentIdBySegmentName(LIVER)
        return [liver] if liver and liver != segment_id else []

    # --- segments -------------------------------------------------------------------------------------
    def prepare_segmentation(self, segmentation_node, volume_node) -> None:
        """Make the segmentation's reference geometry the CT grid (only when it has no segments yet)."""
        if volume_node is None or segmentation_node is None:
            raise InputImageError("Select an input volume and an output segmentation first.")
        if segmentation_node.GetSegmentation().GetNumberOfSegments() == 0:
            segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
        if segmentation_node.GetDisplayNode() is None:
            segmentation_node.CreateDefaultDisplayNodes()

    def ensure_segment(self, segmentation_node, name: str, color: Sequence[float] | None = None) -> str:
        """The ID of the segment named ``name``; created (with SNOMED CT terminology and colour) when missing."""
        segmentation = segmentation_node.GetSegmentation()
        segment_id = segmentation.GetSegmentIdBySegmentName(name)
        if segment_id:
            return segment_id
        from liversam.segmentation import default_color

        if color is None:
            color = default_color(name, segmentation.GetNumberOfSegments())
        segment_id = segmentation.AddEmptySegment(name, name, [float(c) for c in color])
        segmentation.GetSegment(segment_id).SetTerminology(MRMLBridge.terminology_entry_string(name))
        return segment_id

    def ensure_standard_segments(self, segmentation_node) -> dict[str, str]:
        """Create the ``liver`` and ``tumor`` segments when missing; returns name -> segment ID."""
        return {name: self.ensure_segment(segmentation_node, name) for name in STANDARD_SEGMENTS}

    @staticmethod
    def segment_is_empty(segmentation_node, segment_id: str) -> bool:
        """True when the segment has no voxel (or does not exist)."""
        segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
        if segment is None:
            return True
        labelmap = segment.GetRepresentation(
            slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
        )
        if labelmap is None or labelmap.IsEmpty():
            return True
        low, high = labelmap.GetScalarRange()
        if segment.GetLabelValue() < low or segment.GetLabelValue() > high:
            return True
        return not bool(
            np.any(
                slicer.util.arrayFromSegmentInternalBinaryLabelmap(segmentation_node, segment_id)
                == segment.GetLabelValue()
            )
        )

    # --- writing masks ----------------------------------------------------------------------------------
    def write_mask(
        self,
        segmentation_node,
        segment_id: str,
        volume_node,
        mask_kji: np.ndarray,
        k_range: tuple[int, int] | None = None,
        protect_segment_ids: Iterable[str] = (),
        save_undo: bool = True,
    ) -> None:
        """Set a segment to ``mask_kji`` (bool [k, j, i] on the whole volume grid), the Segment Editor way.

        With ``k_range=(k0, k1)`` only those slices (inclusive) are written; other slices keep their content.
        See :meth:`write_slices` for masking, overwrite and undo.
        """
        geometry = MRMLBridge.geometry_from_volume_node(volume_node)
        if tuple(np.shape(mask_kji)) != geometry.shape_kji:
            raise OutputError(
                f"Mask shape {np.shape(mask_kji)} does not match the volume '{volume_node.GetName()}' "
                f"grid {geometry.shape_kji}: the mask must be computed on the selected input volume."
            )
        if k_range is None:
            self._modify(
                segmentation_node, segment_id, volume_node, mask_kji, 0, True, protect_segment_ids, save_undo
            )
        else:
            k0, k1 = int(k_range[0]), int(k_range[1])
            self.write_slices(
                segmentation_node, segment_id, volume_node, np.asarray(mask_kji)[k0 : k1 + 1], k0,
                protect_segment_ids, save_undo,
            )  # fmt: skip

    def write_slices(
        self,
        segmentation_node,
        segment_id: str,
        volume_node,
        slab_kji: np.ndarray,
        k0: int,
        protect_segment_ids: Iterable[str] = (),
        save_undo: bool = True,
    ) -> None:
        """Replace slices ``k0 .. k0 + len(slab) - 1`` of a segment with ``slab_kji`` (bool [k, j, i] or [j, i]).

        The Segment Editor node's editable area (mask mode / mask segment), intensity mask and overwrite mode
        apply as to a manual edit; ``protect_segment_ids`` (e.g. the liver when writing a tumour) are never
        overwritten whatever the overwrite mode says. An undo state is saved first unless ``save_undo`` is
        False. Other slices of the segment are not touched.
        """
        slab = np.asarray(slab_kji)
        if slab.ndim == 2:
            slab = slab[np.newaxis]
        geometry = MRMLBridge.geometry_from_volume_node(volume_node)
        if slab.shape[1:] != geometry.shape_kji[1:] or not (
            0 <= k0 and k0 + slab.shape[0] <= geometry.shape_kji[0]
        ):
            raise OutputError(
                f"Slices {k0}..{k0 + slab.shape[0] - 1} of shape {slab.shape[1:]} do not fit the volume "
                f"'{volume_node.GetName()}' grid {geometry.shape_kji}: the mask must come from the selected input volume."
            )
        self._modify(
            segmentation_node, segment_id, volume_node, slab, int(k0), False, protect_segment_ids, save_undo
        )

    def _modify(
        self, segmentation_node, segment_id, volume_node, slab, k0, whole, protect_segment_ids, save_undo
    ) -> None:
        segmentation = segmentation_node.GetSegmentation()
        if segmentation.GetSegment(segment_id) is None:
            raise OutputError(
                f"Segmentation '{segmentation_node.GetName()}' has no segment '{segment_id}': "
                "select an existing target segment or let LiverSAM create it."
            )
        logic = self.editor_logic(segmentation_node, volume_node)
        editor_node = self.editor_node()
        self._copy_user_settings(segmentation_node)
        # The Segment Editor's editable area and intensity range are applied on the segmentation's reference grid:
        # with either on, the write is put on that grid (else Slicer drops them); with neither, it stays on the CT's.
        masked = (editor_node.GetMaskMode() != slicer.vtkMRMLSegmentationNode.EditAllowedEverywhere
                  or bool(editor_node.GetSourceVolumeIntensityMask()))  # fmt: skip
        ijk_to_segmentation = MRMLBridge.ijk_to_segmentation_matrix(volume_node, segmentation_node)
        modifier = MRMLBridge.oriented_image_from_slab(slab, k0, ijk_to_segmentation)
        if masked:
            modifier = self._on_reference_grid(logic, segmentation_node, modifier)  # before the undo state: may refuse
        if save_undo:
            self._save_undo_state(logic, segmentation_node)
        extent = list(modifier.GetExtent())
        protect = [
            sid for sid in {*protect_segment_ids, *self.protected_segments(segmentation_node, segment_id)}
            if sid and sid != segment_id
        ]
        # The logic's editable area leaves out the *selected* segment only ("outside all segments" would
        # otherwise count the written segment's own voxels as not editable: vtkSlicerSegmentEditorLogic::
        # UpdateMaskLabelmap passes the node's selected segment to GenerateEditMask). LiverSAM's own node.
        editor_node.SetSelectedSegmentID(segment_id)
        saved_overwrite = editor_node.GetOverwriteMode()
        if protect and saved_overwrite != editor_node.OverwriteNone:
            # The overwrite mode decides which *other* segments lose the written voxels: protecting a
            # segment means no overwrite for this write (the user's setting is restored right after).
            editor_node.SetOverwriteMode(editor_node.OverwriteNone)
        try:
            if whole:
                logic.ModifySegmentByLabelmap(
                    segmentation_node, segment_id, modifier, logic.ModificationModeSet, extent, True, False
                )
            else:
                # "Set" replaces the whole segment; a slab update erases the slab, then adds the new mask.
                self._erase_own_voxels(
                    logic, editor_node, segmentation_node, segment_id, volume_node, slab.shape, k0, ijk_to_segmentation,
                    masked,
                )
                logic.ModifySegmentByLabelmap(
                    segmentation_node, segment_id, modifier, logic.ModificationModeAdd, extent, True, False
                )
        finally:
            if editor_node.GetOverwriteMode() != saved_overwrite:
                editor_node.SetOverwriteMode(saved_overwrite)

    @staticmethod
    def _on_reference_grid(logic, segmentation_node, modifier):
        """``modifier`` on the segmentation's reference grid, where the Segment Editor's editable area and intensity
        range apply (:func:`MRMLBridge.on_reference_grid`); an error when the CT lies outside that grid."""
        on_grid = MRMLBridge.on_reference_grid(modifier, logic.GetReferenceImageGeometryString())
        if on_grid is None:
            raise OutputError(
                f"Segmentation '{segmentation_node.GetName()}' was made on a grid that does not cover the input CT, "
                "so nothing can be written into it: choose 'Create new Segmentation' as output, or set its geometry "
                "to the CT (Segment Editor > Specify geometry)."
            )
        return on_grid

    @classmethod
    def _erase_own_voxels(
        cls, logic, editor_node, segmentation_node, segment_id, volume_node, slab_shape, k0, ijk_to_segmentation,
        on_reference_grid: bool,
    ) -> None:
        """Erase ``segment_id``'s voxels in the slab's editable area (a slab write's first half) and nothing else.

        Under the editable area "inside one segment" Slicer's erase *gives* the erased voxels to that segment
        (split by erasing, vtkSlicerSegmentEditorLogic::ModifySegmentByLabelmap), so a tumour slab write handed the
        old tumour voxels to the liver; it also makes all of the erased segment's own voxels editable, so old voxels
        outside the liver went, and the following add (inside the liver only) could not put them back. So in that
        mode the erase reaches the slab inside the mask segment only, with the editable area "everywhere" (no
        hand-over): as Slicer's "set" keeps a segment outside the editable area. In the other modes the logic's own
        erase already does that."""
        mode = editor_node.GetMaskMode()
        mask_id = editor_node.GetMaskSegmentID()
        inside_one = (
            mode == slicer.vtkMRMLSegmentationNode.EditAllowedInsideSingleSegment
            and bool(mask_id)
            and mask_id != segment_id
            and segmentation_node.GetSegmentation().GetSegment(mask_id) is not None
        )
        region = np.ones(slab_shape, dtype=bool)
        if inside_one:
            region &= MRMLBridge.segment_mask(segmentation_node, mask_id, volume_node)[k0 : k0 + slab_shape[0]]
            editor_node.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedEverywhere)
        try:
            erase = MRMLBridge.oriented_image_from_slab(region, k0, ijk_to_segmentation)
            if on_reference_grid:  # on the grid the add goes to
                erase = cls._on_reference_grid(logic, segmentation_node, erase)
            logic.ModifySegmentByLabelmap(
                segmentation_node, segment_id, erase, logic.ModificationModeRemove, list(erase.GetExtent()), True, False,
            )  # fmt: skip
        finally:
            if inside_one:
                editor_node.SetMaskMode(mode)

    def _save_undo_state(self, logic, segmentation_node, undo_key: Hashable | None = None) -> None:
        """Save the segmentation's state before a write (one state per user action).

        ``undo_key`` identifies a live-update action (segmentation, segment, slice): consecutive writes with
        the same key share the first one's state. The state goes into the Segment Editor widget's history
        when it edits this segmentation (callbacks given), else into the logic's own.
        """
        if undo_key is not None and undo_key == self._last_undo_key:
            return
        self._last_undo_key = undo_key
        if self.save_state_for_undo is not None and self.shared_editor_edits(segmentation_node):
            self.save_state_for_undo()
            self._last_history = "shared"
        else:
            logic.SaveStateForUndo()
            self._last_history = "own"

    def end_user_action(self) -> None:
        """The next live write starts a new undo state (prompts cleared, propagation, undo, scene change)."""
        self._last_undo_key = None

    @property
    def shares_undo(self) -> bool:
        """True when the last write went into the Segment Editor's history (it edits the same segmentation)."""
        return self._last_history == "shared" and self.undo_shared is not None

    def can_undo(self) -> bool:
        """Whether the logic's own history has a state to restore."""
        return self._editor_logic is not None and self._editor_logic.CanUndo()

    def undo(self) -> None:
        """Restore the segmentation as it was before the last change (in the history that change went to)."""
        self.end_user_action()
        if self.shares_undo:
            self.undo_shared()
        elif self.can_undo():
            self._editor_logic.Undo()

    def redo(self) -> None:
        self.end_user_action()
        if self.shares_undo:
            if self.redo_shared is not None:
                self.redo_shared()
        elif self._editor_logic is not None and self._editor_logic.CanRedo():
            self._editor_logic.Redo()

    # --- results of the server --------------------------------------------------------------------------
    def apply_slice_masks(
        self,
        masks: Mapping[int, np.ndarray],
        segmentation_node,
        segment_id: str,
        volume_node,
        clip_to_segment_id: str | None = None,
        undo_key: Hashable | None = None,
    ) -> None:
        """Write one mask per slice (``{k: bool [j, i]}``) into a segment; one undo state (per ``undo_key``).

        With ``clip_to_segment_id`` (the liver, when writing a tumour) each mask is clipped to that
        segment. Main thread.
        """
        if not masks:
            return
        clip = (
            MRMLBridge.segment_mask(segmentation_node, clip_to_segment_id, volume_node)
            if clip_to_segment_id
            else None
        )
        logic = self.editor_logic(segmentation_node, volume_node)
        self._save_undo_state(logic, segmentation_node, undo_key)
        for k, mask in sorted(masks.items()):
            mask_ji = np.asarray(mask, dtype=bool)
            if clip is not None:
                mask_ji = mask_ji & clip[int(k)]
            self.write_slices(
                segmentation_node, segment_id, volume_node, mask_ji, int(k),
                protect_segment_ids=[clip_to_segment_id] if clip_to_segment_id else (), save_undo=False,
            )  # fmt: skip

    @staticmethod
    def segment_prompts(
        name: str, label: int, markups_prompts, inside: str | None = None, propagate: bool = True, color=None
    ):
        """A core ``SegmentPrompts`` for one structure from the prompts placed in Slicer."""
        from liversam.prompts import SegmentPrompts
        from liversam.segmentation import default_color

        return SegmentPrompts(
            name=name,
            label=int(label),
            color=tuple(color) if color is not None else default_color(name, label - 1),
            slices=markups_prompts.to_slice_prompts(),
            inside=inside,
            propagate=propagate,
        )

    # --- results of the core pipeline ---------------------------------------------------------------------
    def apply_result(
        self,
        result,
        segmentation_node,
        volume_node,
        k_range: tuple[int, int] | None = None,
        protect: dict[str, Sequence[str]] | None = None,
    ) -> dict[str, str]:
        """Write every segment of a ``liversam.segmentation.SegmentationResult`` into the segmentation node.

        Segments are matched by name (created when missing); one undo state covers the whole result.
        ``protect`` maps a segment name to names of segments it must not overwrite (e.g.
        ``{"tumor": ["liver"]}``). Returns name -> segment ID.
        """
        geometry = MRMLBridge.geometry_from_volume_node(volume_node)
        if not geometry.is_close(result.geometry):
            raise OutputError(
                "The segmentation result was computed on a different grid than the input volume "
                f"'{volume_node.GetName()}' ({geometry.describe_difference(result.geometry)}); run it again."
            )
        self.prepare_segmentation(segmentation_node, volume_node)
        ids = {
            seg.name: self.ensure_segment(segmentation_node, seg.name, seg.color) for seg in result.segments
        }
        logic = self.editor_logic(segmentation_node, volume_node)
        self._save_undo_state(logic, segmentation_node)
        protect = protect or {}
        for seg in result.segments:
            protected_ids = [
                ids.get(n) or self._segment_id(segmentation_node, n) for n in protect.get(seg.name, ())
            ]
            self.write_mask(
                segmentation_node,
                ids[seg.name],
                volume_node,
                seg.mask_kji,
                k_range=k_range,
                protect_segment_ids=[p for p in protected_ids if p],
                save_undo=False,
            )
        return ids

    @staticmethod
    def _segment_id(segmentation_node, name: str) -> str:
        return segmentation_node.GetSegmentation().GetSegmentIdBySegmentName(name)

    def result_from_segmentation(
        self, segmentation_node, volume_node, segment_ids: Sequence[str] | None = None
    ):
        """A ``SegmentationResult`` of the node's segments on the volume node's own grid (labels 1, 2, ... in order),
        also for a volume stored in sagittal or coronal slices (what is written overlays the volume's file)."""
        from liversam.segmentation import Segment, SegmentationResult

        geometry = MRMLBridge.input_geometry_from_volume_node(volume_node)
        segmentation = segmentation_node.GetSegmentation()
        if segment_ids is None:
            segment_ids = [segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments())]
        segments = []
        for label, segment_id in enumerate(segment_ids, start=1):
            segment = segmentation.GetSegment(segment_id)
            segments.append(
                Segment(
                    name=segment.GetName(),
                    label=label,
                    mask_kji=MRMLBridge.segment_mask(segmentation_node, segment_id, volume_node, on_input_grid=True),
                    color=tuple(segment.GetColor()),
                )
            )
        return SegmentationResult(
            geometry=geometry, segments=segments, provenance={"source": "LiverSAM (3D Slicer)"}
        )

    # --- lesions ------------------------------------------------------------------------------------------
    def lesion_table(self, segmentation_node, volume_node, segment_id: str | None = None) -> list:
        """The per-lesion table of a tumour segment (``liversam.lesions.Lesion`` list, largest first).

        ``segment_id`` defaults to the segment named ``tumor``; an absent segment gives an empty table.
        Each lesion is one 3D connected component: ``lesion_id``, ``volume_ml``,
        ``longest_axial_diameter_mm``, ``slice_first`` / ``slice_last`` (k), ``centre_lps`` (mm), ``voxels``.
        """
        from liversam.lesions import lesion_table_from_mask

        segmentation = segmentation_node.GetSegmentation()
        segment_id = segment_id or segmentation.GetSegmentIdBySegmentName(TUMOR)
        segment = segmentation.GetSegment(segment_id) if segment_id else None
        if segment is None:
            return []
        mask = MRMLBridge.segment_mask(segmentation_node, segment_id, volume_node)
        return lesion_table_from_mask(
            mask, MRMLBridge.geometry_from_volume_node(volume_node), segment.GetName()
        )

    # --- export -------------------------------------------------------------------------------------------
    def export_seg_nrrd(self, segmentation_node, path: str | Path) -> Path:
        """Write the segmentation with MRML's own storage node (``.seg.nrrd``), atomically."""
        from liversam.atomic_write import atomic_path

        path = Path(path)
        if not path.name.endswith(".seg.nrrd"):
            raise OutputError(f"'{path}': a Slicer segmentation file name must end with '.seg.nrrd'.")
        storage = slicer.vtkMRMLSegmentationStorageNode()
        storage.SetUseCompression(True)
        with atomic_path(path) as tmp:
            storage.SetFileName(str(tmp))
            if not storage.WriteData(segmentation_node):
                raise OutputError(
                    f"Could not write '{path}': {storage.GetWriteStateAsString()}. Check the folder is writable."
                )
        return path

    def export_labelmap(
        self, segmentation_node, volume_node, path: str | Path, segment_ids: Sequence[str] | None = None
    ) -> Path:
        """Write a labelmap (``.nrrd``, ``.nii``, ``.nii.gz``) on the CT grid, labels 1, 2, ... by segment order."""
        from liversam.atomic_write import atomic_path

        path = Path(path)
        if not any(path.name.endswith(s) for s in (".nrrd", ".nii", ".nii.gz")) or path.name.endswith(
            ".seg.nrrd"
        ):
            raise OutputError(f"'{path}': labelmap exports are written as .nrrd, .nii or .nii.gz files.")
        import vtk

        ids = vtk.vtkStringArray()
        segmentation = segmentation_node.GetSegmentation()
        for segment_id in segment_ids or [
            segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments())
        ]:
            ids.InsertNextValue(segment_id)
        labelmap_node = self.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__LiverSAM_export__")
        try:
            logic = slicer.modules.segmentations.logic()
            if not logic.ExportSegmentsToLabelmapNode(segmentation_node, ids, labelmap_node, volume_node):
                raise OutputError(
                    f"Could not convert segmentation '{segmentation_node.GetName()}' to a labelmap."
                )
            storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
            storage.SetUseCompression(True)
            with atomic_path(path) as tmp:
                storage.SetFileName(str(tmp))
                if not storage.WriteData(labelmap_node):
                    raise OutputError(f"Could not write '{path}'. Check the folder is writable.")
        finally:
            display = labelmap_node.GetDisplayNode()
            if display is not None:
                # The export made a "<segmentation>_ColorTable" node for the labelmap; it goes with it
                # (as in slicer.util.arrayFromSegmentBinaryLabelmap)
                color = display.GetColorNode()
                if color is not None and color.GetType() == color.User and (color.GetName() or "").startswith(
                    f"{segmentation_node.GetName()}_ColorTable"
                ):
                    self.scene.RemoveNode(color)
                self.scene.RemoveNode(display)
            self.scene.RemoveNode(labelmap_node)
        return path

    def prepare_dicom_seg_export(
        self,
        segmentation_node,
        volume_node,
        path: str | Path,
        reference_dicom: str | Path | Sequence[str | Path] | None,
        python: str,
        model_name: str = "",
        series_uid: str | None = None,
        segment_ids: Sequence[str] | None = None,
    ) -> DicomSegExport:
        """Get a DICOM SEG export ready (main thread); :meth:`DicomSegExport.run` then writes it off-thread.

        DICOM SEG needs highdicom (and pydicom >= 3), which must not be installed into Slicer's Python
        (Slicer 5.10's DICOM module uses pydicom 2.4). So the non-empty segments (or ``segment_ids``) are
        written to a temporary ``.seg.nrrd`` here with MRML, and ``<python> -m liversam export`` -- the
        LiverSAM environment that runs the server -- turns it into a DICOM SEG referencing the CT's series.
        ``reference_dicom``: the CT's DICOM folder, or its files (Slicer's DICOM database gives the files,
        see :func:`dicom_reference_of_volume`; they are linked into a temporary folder).
        """
        import tempfile

        if not reference_dicom:
            raise OutputError(
                f"DICOM SEG export of '{segmentation_node.GetName()}' needs the input volume's DICOM files: "
                "load the CT from the DICOM database (DICOM module) so LiverSAM can reference it."
            )
        if not python:
            raise OutputError(
                "DICOM SEG export runs in the LiverSAM Python environment (it needs highdicom, which Slicer's "
                "own Python must not get): set the server Python in LiverSAM's Server section."
            )
        segmentation = segmentation_node.GetSegmentation()
        if segment_ids is None:
            segment_ids = [
                sid
                for sid in (segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments()))
                if not self.segment_is_empty(segmentation_node, sid)
            ]
        if not segment_ids:
            raise OutputError(
                f"Segmentation '{segmentation_node.GetName()}' has no non-empty segment to write to '{path}'."
            )
        folder = Path(tempfile.mkdtemp(prefix="liversam-dicomseg-"))
        labelmap = folder / "segments.nii.gz"
        self.export_labelmap(segmentation_node, volume_node, labelmap, segment_ids)
        names = ",".join(
            f"{label}={segmentation.GetSegment(sid).GetName()}" for label, sid in enumerate(segment_ids, start=1)
        )
        if isinstance(reference_dicom, (str, Path)):
            reference_folder = Path(reference_dicom)
        else:
            reference_folder = folder / "reference"
            reference_folder.mkdir()
            for index, file in enumerate(reference_dicom):
                target = reference_folder / f"{index:05d}.dcm"
                try:
                    target.symlink_to(Path(file).resolve())
                except OSError:  # no symlinks (Windows without developer mode): copy
                    import shutil

                    shutil.copyfile(file, target)
        command = [python, "-m", "liversam", "export", str(labelmap), "--reference-dicom", str(reference_folder),
                   "--label-names", names, "--output", str(Path(path))]  # fmt: skip
        if series_uid:
            command += ["--series-uid", series_uid]
        if model_name:
            command += ["--model-name", model_name]
        return DicomSegExport(command=command, output=Path(path), work_folder=folder)


class DicomSegExport:
    """A prepared DICOM SEG export: ``run()`` (blocking, no MRML) writes it and removes the temporary files."""

    def __init__(self, command: list[str], output: Path, work_folder: Path) -> None:
        self.command, self.output, self.work_folder = command, output, work_folder

    def run(self, timeout_s: float = 600.0, env: dict[str, str] | None = None) -> Path:
        """``env``: default the LiverSAM environment's (Slicer's PYTHONHOME / PYTHONPATH removed)."""
        import shutil
        import subprocess
        import sys

        from .ServerConnection import server_environment

        flags = getattr(subprocess, "CREATE_NO_WINDOW", 0) if sys.platform == "win32" else 0
        try:
            done = subprocess.run(self.command, capture_output=True, text=True, timeout=timeout_s,
                                  env=env if env is not None else server_environment(),
                                  creationflags=flags, stdin=subprocess.DEVNULL)  # fmt: skip
        except (OSError, subprocess.TimeoutExpired) as error:
            raise OutputError(f"DICOM SEG export could not run '{self.command[0]}': {error}") from None
        finally:
            shutil.rmtree(self.work_folder, ignore_errors=True)
        if done.returncode != 0:
            raise OutputError(
                f"DICOM SEG export to '{self.output}' failed: {(done.stderr or done.stdout).strip()[-1500:]}"
            )
        return self.output


def dicom_reference_of_volume(volume_node) -> tuple[list[str], str | None]:
    """``(files, series instance UID)`` of the DICOM series a volume was loaded from; ``([], None)`` otherwise.

    Slicer's DICOM loader stores the instance UIDs in the node attribute ``DICOM.instanceUIDs``; the files
    and the series UID come from the application's DICOM database.
    """
    uids = (volume_node.GetAttribute("DICOM.instanceUIDs") or "").split()
    database = getattr(slicer, "dicomDatabase", None)
    if not uids or database is None:
        return [], None
    files = [f for f in (database.fileForInstance(uid) for uid in uids) if f]
    series_uid = database.instanceValue(uids[0], "0020,000E") or None
    return files, series_uid


# How far a DICOM instance's slice may lie from the volume's slice of the same index: the tolerance of the core's DICOM
# reader and SEG writer (liversam.dicom_series POSITION_TOLERANCE_MM / POSITION_TOLERANCE_FRACTION of the spacing).
DICOM_GRID_TOLERANCE_MM = 0.01
DICOM_GRID_TOLERANCE_FRACTION = 0.01
_POSITION, _ORIENTATION, _SPACING, _ROWS, _COLUMNS = "0020,0032", "0020,0037", "0028,0030", "0028,0010", "0028,0011"


def _numbers(text: str | None) -> list[float]:
    """A DICOM database value ("a\\b\\c": multiple values joined by backslashes) as numbers; [] when it is not."""
    try:
        return [float(v) for v in (text or "").split("\\") if v.strip()]
    except ValueError:
        return []


def dicom_slice_corners(position_lps, orientation, pixel_spacing, rows: int, columns: int) -> np.ndarray:
    """The RAS corners (2, 2, 3) of one DICOM slice, as Slicer's DICOMScalarVolumePlugin computes them
    (``AcquisitionModeling.sliceCornersFromDICOM``, v5.10.0): ImagePositionPatient, plus ``columns`` x PixelSpacing[1]
    along the row cosines and ``rows`` x PixelSpacing[0] along the column cosines."""
    ras = np.array([-1.0, -1.0, 1.0])
    position = np.asarray(position_lps, float) * ras
    row, column = np.asarray(orientation[:3], float) * ras, np.asarray(orientation[3:6], float) * ras
    along_row, along_column = columns * float(pixel_spacing[1]) * row, rows * float(pixel_spacing[0]) * column
    return np.array([[position + c * along_row + r * along_column for c in range(2)] for r in range(2)])


def volume_slice_corners(ijk_to_ras: np.ndarray, dimensions: Sequence[int]) -> np.ndarray:
    """The RAS corners (nk, 2, 2, 3) of each slice of a volume (``AcquisitionModeling.sliceCornersFromIJKToRAS``)."""
    columns, rows, slices = (int(d) for d in dimensions)
    m = np.asarray(ijk_to_ras, float)
    return np.array([[[(m @ [c * columns, r * rows, k, 1.0])[:3] for c in range(2)] for r in range(2)]
                     for k in range(slices)])  # fmt: skip


def dicom_grid_difference(ijk_to_ras: np.ndarray, dimensions: Sequence[int], instances: Sequence[dict]) -> str | None:
    """How a volume's grid (its own IJK-to-RAS matrix and dimensions) differs from the DICOM instances it names as its
    slices (``instances[k]``: the tags of slice ``k``: ``position``, ``orientation``, ``spacing``, ``rows``,
    ``columns``), in words; None when every slice's corners lie within the tolerance of the instance's (the check
    Slicer's DICOM loader makes before it adds an acquisition transform, with the core's tolerance)."""
    columns, rows, slices = (int(d) for d in dimensions)
    if len(instances) != slices:
        return f"it has {slices} slices, the series {len(instances)} images"
    spacing = np.linalg.norm(np.asarray(ijk_to_ras, float)[:3, :3], axis=0)
    tolerance = max(DICOM_GRID_TOLERANCE_MM, DICOM_GRID_TOLERANCE_FRACTION * float(spacing.min()))
    volume = volume_slice_corners(ijk_to_ras, dimensions)
    worst, worst_k = 0.0, 0
    for k, tags in enumerate(instances):
        if (int(tags["rows"]), int(tags["columns"])) != (rows, columns):
            return f"its slices are {columns} x {rows} voxels, image {k + 1} of the series {tags['columns']} x {tags['rows']}"
        error = float(np.abs(volume[k] - dicom_slice_corners(tags["position"], tags["orientation"], tags["spacing"],
                                                             rows, columns)).max())  # fmt: skip
        if error > worst:
            worst, worst_k = error, k
    if worst > tolerance:
        return (f"its slice {worst_k} lies up to {worst:.2f} mm from the image of the series it stands for "
                f"(tolerance {tolerance:.2f} mm)")  # fmt: skip
    return None


def dicom_series_irregularity(instances: Sequence[dict]) -> str | None:
    """Why the images of a series (``instances``: their tags, as for :func:`dicom_grid_difference`) do not form a
    regular grid, in words; None when they do. An irregular series (uneven slice spacing, a tilted gantry) cannot be a
    volume of regular slices that are its images: Slicer's reader puts it on a regular grid (and by default adds the
    acquisition-geometry transform, DICOMScalarVolumePlugin ``AcquisitionModeling``)."""
    if len(instances) < 2:
        return None
    orientations = np.array([tags["orientation"] for tags in instances], float)
    if np.abs(orientations - orientations[0]).max() > 1e-4:
        return "its images do not all have the same orientation"
    normal = np.cross(orientations[0, :3], orientations[0, 3:6])
    positions = np.array([tags["position"] for tags in instances], float)
    steps = np.diff(positions, axis=0)
    along = np.abs(steps @ normal)
    spacing = np.asarray(instances[0]["spacing"], float)
    tolerance = max(DICOM_GRID_TOLERANCE_MM, DICOM_GRID_TOLERANCE_FRACTION * float(np.median(along)))
    if along.max() - along.min() > tolerance:
        return f"its images are unevenly spaced ({along.min():.2f} to {along.max():.2f} mm apart)"
    sideways = np.linalg.norm(steps - np.outer(steps @ normal, normal), axis=1)
    if sideways.max() > max(DICOM_GRID_TOLERANCE_MM, DICOM_GRID_TOLERANCE_FRACTION * float(spacing.min())):
        return f"its images are shifted sideways from one to the next (up to {sideways.max():.2f} mm: a tilted gantry)"
    return None


@dataclass(frozen=True)
class DicomGridMismatch:
    """How a volume's grid differs from the DICOM images it names (:func:`dicom_grid_problem`): ``difference`` in
    words; ``irregular``: why those images do not form a regular grid themselves (:func:`dicom_series_irregularity`),
    None when they do (then something changed the volume's grid after it was loaded)."""

    difference: str
    irregular: str | None = None


def dicom_grid_problem(volume_node) -> DicomGridMismatch | None:
    """How this volume's grid differs from the DICOM instances it was loaded from (it names them), when it does: a
    DICOM SEG of it cannot reference them. None when its grid is theirs (or they cannot be checked: no DICOM database,
    a multi-frame image, tags missing: the SEG writer checks the series again).

    A SEG's frame ``k`` is the referenced series' slice ``k``, and LiverSAM writes it from the volume's own voxels
    (``export_labelmap``: the volume node's grid, without its parent transform). The two differ when

    - the series itself is irregular (uneven slice spacing, a tilted gantry): Slicer reads it onto a regular grid whose
      slices are not its images, whether or not it adds (and the user hardens) the acquisition-geometry transform
      (DICOMScalarVolumePlugin ``AcquisitionModeling``, v5.10.0; hardening a grid transform reslices onto the same
      grid, vtkMRMLVolumeNode::ApplyNonLinearTransform): no DICOM SEG of this series can come from a regular CT;
    - the volume was changed after it was loaded (a hardened registration moved its grid; resampled, cropped), while it
      still names the instances (``DICOM.instanceUIDs``): the segmentation would be written onto the wrong slices, or
      moved. The series loaded again is fine."""
    uids = (volume_node.GetAttribute("DICOM.instanceUIDs") or "").split()
    database = getattr(slicer, "dicomDatabase", None)
    image = volume_node.GetImageData()
    if not uids or database is None or image is None:
        return None
    dimensions = image.GetDimensions()
    if len(uids) == 1 and dimensions[2] > 1:
        return None  # one multi-frame image: per-frame positions are not in the database's tags
    instances = []
    for uid in uids:
        position, orientation = _numbers(database.instanceValue(uid, _POSITION)), _numbers(database.instanceValue(uid, _ORIENTATION))
        spacing, rows, columns = (_numbers(database.instanceValue(uid, tag)) for tag in (_SPACING, _ROWS, _COLUMNS))
        if len(position) != 3 or len(orientation) != 6 or len(spacing) != 2 or not rows or not columns:
            logger.info("LiverSAM: no slice geometry in the DICOM database for instance %s: the SEG writer checks it", uid)
            return None
        instances.append({"position": position, "orientation": orientation, "spacing": spacing,
                          "rows": int(rows[0]), "columns": int(columns[0])})  # fmt: skip
    difference = dicom_grid_difference(MRMLBridge.local_ijk_to_ras_matrix(volume_node), dimensions, instances)
    if difference is None:
        return None
    return DicomGridMismatch(difference, dicom_series_irregularity(instances))


def dicom_files_of_volume(volume_node) -> list[str]:
    """The DICOM files a volume was loaded from (see :func:`dicom_reference_of_volume`)."""
    return dicom_reference_of_volume(volume_node)[0]
