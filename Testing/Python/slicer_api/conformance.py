"""Check the Slicer modules' calls against the API listing that ``extract_api.py`` read from Slicer's headers.

The modules are parsed with ``ast``; the type of a receiver is inferred from what the code itself says:

- ``self.ui.<name>`` -> the widget class in the module's ``.ui`` file;
- constructors (``slicer.vtkX()``, ``qt.QX(...)``), ``scene.AddNewNodeByClass("vtkX", ...)``,
  ``CreateNodeByClass`` / ``GetSingletonNode`` / ``GetFirstNodeByClass`` with a class-name literal;
- annotations of parameters, variables, attributes (``self.x: qt.QTimer``) and return values;
- the return type the listing records for a method (``node.GetSegmentation().GetSegment(id)``);
- ``slicer.mrmlScene`` / ``slicer.app``, the parameter node's typed members, and a few parameter names
  that the helpers use consistently for one node class (:data:`PARAMETER_NAMES`).

Then every ``receiver.method(...)``, every attribute read or written on a known receiver and every
``receiver.connect("signal(args)", ...)`` must exist in the listing for that class and its bases, under
the rules of PythonQt / VTK wrapping (see ``extract_api.py``). VTK base classes outside Slicer's source
(``vtkObject``, ``vtkImageData``, ...) are looked up on the ``vtk`` Python module.
"""

from __future__ import annotations

import ast
import json
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
LISTING = HERE / "slicer_api_v5.10.0.json"

#: Parameter names the Slicer helpers use for exactly one node class (typed there by convention).
PARAMETER_NAMES = {
    "segmentation_node": "vtkMRMLSegmentationNode", "segmentationNode": "vtkMRMLSegmentationNode",
    "volume_node": "vtkMRMLScalarVolumeNode", "volumeNode": "vtkMRMLScalarVolumeNode",
    "roi_node": "vtkMRMLMarkupsROINode", "markups_node": "vtkMRMLMarkupsNode",
    "editor_node": "vtkMRMLSegmentEditorNode", "table_node": "vtkMRMLTableNode",
    "chart_node": "vtkMRMLPlotChartNode", "labelmap_node": "vtkMRMLLabelMapVolumeNode",
    "interaction_node": "vtkMRMLInteractionNode", "selection_node": "vtkMRMLSelectionNode",
    "scene": "vtkMRMLScene",
}  # fmt: skip
#: Methods PythonQt adds to every QObject (not in any header).
PYTHONQT_OBJECT_METHODS = {"connect", "disconnect", "className", "help", "delete"}
GLOBALS = {("slicer", "mrmlScene"): "vtkMRMLScene", ("slicer", "app"): "qSlicerApplication"}
FACTORY_METHODS = {"AddNewNodeByClass": 0, "CreateNodeByClass": 0, "GetSingletonNode": 1, "GetFirstNodeByClass": 0}


@dataclass(frozen=True)
class Violation:
    path: str
    line: int
    cls: str
    member: str
    what: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.cls} has no {self.what} '{self.member}' in Slicer 5.10"


class Listing:
    def __init__(self, data: dict) -> None:
        self.data = data
        self.classes: dict[str, dict] = data["classes"]
        self._cache: dict[tuple[str, str], set[str]] = {}

    def knows(self, cls: str) -> bool:
        return cls in self.classes

    def chain(self, cls: str) -> list[str]:
        """The class and all its bases in the listing (breadth first)."""
        order, queue = [], [cls]
        while queue:
            name = queue.pop(0)
            if name in order or name not in self.classes:
                continue
            order.append(name)
            queue.extend(self.classes[name]["bases"])
        return order

    def external_bases(self, cls: str) -> list[str]:
        result = []
        for name in self.chain(cls):
            result += [b for b in self.classes[name]["bases"] if b not in self.classes]
        return result

    def members(self, cls: str, kind: str = "any") -> set[str]:
        """What Python may use on ``cls``: ``kind`` any / signals (normalised signatures)."""
        key = (cls, kind)
        if key in self._cache:
            return self._cache[key]
        result: set[str] = set()
        for name in self.chain(cls):
            info = self.classes[name]
            if kind == "signals":
                result |= set(info["signals"])
                continue
            # PythonQt decorators (extract_api.decorator_members: slicer.app.testingEnabled()) on every kind of class
            result |= {s.split("(")[0] for s in info["signals"]} | set(info["properties"]) | set(info.get("decorators", ()))
            if info["kind"] in ("qt", "vtk"):
                result |= set(info["methods"]) | set(info["enums"])
            else:  # CTK / qMRML / qSlicer: only the meta-object is visible to Python
                result |= set(info["slots"]) | set(info["invokables"]) | set(info["enums"])
        if kind == "any" and any(self.classes[n]["kind"] != "vtk" for n in self.chain(cls)):
            result |= PYTHONQT_OBJECT_METHODS
        self._cache[key] = result
        return result

    def has(self, cls: str, member: str) -> bool:
        if member in self.members(cls):
            return True
        for base in self.external_bases(cls):  # VTK classes Slicer does not define
            try:
                import vtk

                if hasattr(getattr(vtk, base), member):
                    return True
            except (ImportError, AttributeError):
                continue
        return False

    def returns(self, cls: str, method: str) -> str | None:
        for name in self.chain(cls):
            returned = self.classes[name]["methods"].get(method)
            if returned:
                return self.type_name(returned)
        return None

    def type_name(self, text: str) -> str | None:
        match = re.search(r"(vtk\w+|q\w+|Q\w+|ctk\w+)\*?$", text.replace("vtkSmartPointer<", "").replace(">", ""))
        if match and match.group(1) in self.classes:
            return match.group(1)
        return None


def load_listing(path: Path = LISTING) -> Listing:
    return Listing(json.loads(path.read_text(encoding="utf-8")))


def ui_classes(ui_file: Path) -> dict[str, str]:
    return {w.get("name"): w.get("class") for w in ET.parse(ui_file).getroot().iter("widget")}


def normalize_signal(text: str) -> str:
    name, _, args = text.partition("(")
    parts = [re.sub(r"\bconst\b|&", "", a).replace(" ", "") for a in args.rstrip(")").split(",") if a.strip()]
    return f"{name}({','.join(parts)})"


class Checker(ast.NodeVisitor):
    """Collects :class:`Violation` s for one module source."""

    def __init__(self, listing: Listing, path: str, ui: dict[str, str], node_members: dict[str, str]) -> None:
        self.listing, self.path, self.ui, self.node_members = listing, path, ui, node_members
        self.violations: list[Violation] = []
        self.checked = 0
        self.env: list[dict[str, str]] = [{}]
        self.self_attrs: dict[str, str] = {}
        self.self_methods: dict[str, str] = {}
        self.functions: dict[str, str] = {}

    # --- types ---------------------------------------------------------------------------------------
    def annotation_type(self, node: ast.expr | None) -> str | None:
        if node is None:
            return None
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            try:
                node = ast.parse(node.value, mode="eval").body
            except SyntaxError:
                return None
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
            return self.annotation_type(node.left) or self.annotation_type(node.right)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in ("slicer", "qt", "ctk", "vtk"):
            return node.attr if self.listing.knows(node.attr) else None
        if isinstance(node, ast.Name) and self.listing.knows(node.id):
            return node.id
        return None

    def lookup(self, name: str) -> str | None:
        for scope in reversed(self.env):
            if name in scope:
                return scope[name]
        return None

    def infer(self, node: ast.expr) -> str | None:
        if isinstance(node, ast.Name):
            return self.lookup(node.id)
        if isinstance(node, ast.Attribute):
            value = node.value
            if isinstance(value, ast.Name) and (value.id, node.attr) in GLOBALS:
                return GLOBALS[(value.id, node.attr)]
            if isinstance(value, ast.Attribute) and isinstance(value.value, ast.Name) and value.value.id == "self":
                if value.attr == "ui":
                    return self.ui.get(node.attr)
            if isinstance(value, ast.Name) and value.id == "self":
                return self.self_attrs.get(node.attr)
            if self.is_parameter_node(value):
                return self.node_members.get(node.attr)
            return None
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute):
                if isinstance(func.value, ast.Name) and func.value.id in ("slicer", "qt", "ctk") and self.listing.knows(func.attr):
                    return func.attr
                if func.attr in FACTORY_METHODS and len(node.args) > FACTORY_METHODS[func.attr]:
                    literal = node.args[FACTORY_METHODS[func.attr]]
                    if isinstance(literal, ast.Constant) and isinstance(literal.value, str) and self.listing.knows(literal.value):
                        return literal.value
                if isinstance(func.value, ast.Name) and func.value.id == "self" and func.attr in self.self_methods:
                    return self.self_methods[func.attr]
                receiver = self.infer(func.value)
                if receiver is not None:
                    return self.listing.returns(receiver, func.attr)
            if isinstance(func, ast.Name) and func.id in self.functions:
                return self.functions[func.id]
        return None

    @staticmethod
    def is_parameter_node(node: ast.expr) -> bool:
        return (isinstance(node, ast.Name) and node.id in ("p", "parameterNode")) or (
            isinstance(node, ast.Attribute) and node.attr == "_parameterNode"
        )

    # --- checks ---------------------------------------------------------------------------------------------
    def report(self, node: ast.AST, cls: str, member: str, what: str) -> None:
        self.violations.append(Violation(self.path, getattr(node, "lineno", 0), cls, member, what))

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if isinstance(func, ast.Attribute):
            receiver = self.infer(func.value)
            if receiver is not None:
                self.checked += 1
                if not self.listing.has(receiver, func.attr):
                    self.report(node, receiver, func.attr, "method, slot or invokable")
                elif func.attr == "connect" and node.args and isinstance(node.args[0], ast.Constant):
                    signature = normalize_signal(str(node.args[0].value))
                    if signature not in self.listing.members(receiver, "signals"):
                        self.report(node, receiver, signature, "signal")
            if isinstance(func.value, ast.Name) and func.value.id in ("slicer", "qt", "ctk") and func.attr[:1] in ("v", "q", "Q", "c"):
                if not self.listing.knows(func.attr) and func.attr.startswith(("vtkMRML", "vtkSlicer", "qMRML", "ctk")):
                    self.report(node, func.value.id, func.attr, "class")
        self.generic_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        parent = getattr(node, "_parent", None)
        is_called = isinstance(parent, ast.Call) and parent.func is node
        if not is_called:
            receiver = self.infer(node.value)
            if receiver is not None and not (isinstance(parent, ast.Attribute) and parent.attr in ("disconnect", "connect")):
                self.checked += 1
                if not self.listing.has(receiver, node.attr):
                    self.report(node, receiver, node.attr, "property, enum value or member")
        self.generic_visit(node)

    # --- scopes -----------------------------------------------------------------------------------------------
    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        saved = (self.self_attrs, self.self_methods)
        self.self_attrs, self.self_methods = {}, {}
        for item in ast.walk(node):
            if isinstance(item, ast.FunctionDef):
                returned = self.annotation_type(item.returns)
                if returned:
                    self.self_methods[item.name] = returned
            if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Attribute):
                typed = self.annotation_type(item.annotation)
                if typed and isinstance(item.target.value, ast.Name) and item.target.value.id == "self":
                    self.self_attrs[item.target.attr] = typed
        for item in ast.walk(node):  # self.x = <typed expression>
            if isinstance(item, ast.Assign):
                for target in item.targets:
                    if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self":
                        typed = self.infer(item.value)
                        if typed and target.attr not in self.self_attrs:
                            self.self_attrs[target.attr] = typed
        self.generic_visit(node)
        self.self_attrs, self.self_methods = saved

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        scope: dict[str, str] = {}
        for arg in node.args.args + node.args.kwonlyargs:
            typed = self.annotation_type(arg.annotation) or PARAMETER_NAMES.get(arg.arg)
            if typed:
                scope[arg.arg] = typed
        self.env.append(scope)
        for statement in node.body:
            self.visit(statement)
        self.env.pop()

    def visit_Assign(self, node: ast.Assign) -> None:
        self.visit(node.value)
        typed = self.infer(node.value)
        for target in node.targets:
            if isinstance(target, ast.Name):
                if typed:
                    self.env[-1][target.id] = typed
                else:
                    self.env[-1].pop(target.id, None)
            self.visit(target)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is not None:
            self.visit(node.value)
        typed = self.annotation_type(node.annotation) or (self.infer(node.value) if node.value else None)
        if isinstance(node.target, ast.Name) and typed:
            self.env[-1][node.target.id] = typed


def check_source(source: str, path: str, listing: Listing, ui: dict[str, str] | None = None,
                 node_members: dict[str, str] | None = None) -> Checker:  # fmt: skip
    tree = ast.parse(source)
    for parent in ast.walk(tree):
        for child in ast.iter_child_nodes(parent):
            child._parent = parent  # type: ignore[attr-defined]
    checker = Checker(listing, path, ui or {}, node_members or {})
    for item in tree.body:  # module-level functions with a return annotation
        if isinstance(item, ast.FunctionDef):
            returned = checker.annotation_type(item.returns)
            if returned:
                checker.functions[item.name] = returned
    checker.visit(tree)
    return checker


def parameter_node_members(parameters_file: Path, listing: Listing) -> dict[str, str]:
    """Node-typed members of the @parameterNodeWrapper class (``p.inputVolume`` -> vtkMRMLScalarVolumeNode)."""
    members = {}
    for node in ast.walk(ast.parse(parameters_file.read_text(encoding="utf-8"))):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(node.annotation, ast.Name):
            if listing.knows(node.annotation.id):
                members[node.target.id] = node.annotation.id
    return members
