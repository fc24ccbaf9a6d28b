"""Extract the Python-visible API of the Qt / CTK / qMRML / vtkMRML / vtkSlicer classes LiverSAM uses.

Reads the C++ headers of Slicer (at the minimum supported release tag), of the CTK commit that release
builds (``SuperBuild/External_CTK.cmake`` at that tag) and of Qt 5.15 (the Qt Slicer 5.10 is built and
tested with), and writes a JSON listing that ``test_slicer_api_conformance.py`` checks the modules
against. The headers are not committed; this script and its output are.

What Python can call, by kind of class (PythonQt and VTK wrapping rules):

- Qt classes (PythonQt's generated wrappers): every public method, slot, signal and ``Q_PROPERTY``;
- CTK / qMRML / qSlicer classes (``QObject`` subclasses that CTK wraps for constructors only,
  ``CMake/ctkWrapPythonQt.py``): public slots, ``Q_INVOKABLE`` methods, signals and ``Q_PROPERTY`` only,
  plus what their Qt base classes offer;
- VTK / MRML / vtkSlicer classes (VTK Python wrapping): every public method, including those the
  ``vtkGet*Macro`` / ``vtkSet*Macro`` / ``vtkBooleanMacro`` declare, and public enum values;
- PythonQt decorators (Slicer's ``*PythonQtDecorators.h``): their public slots add methods to a class, listed as its
  ``decorators`` (``static_<Class>_<name>``: ``<name>`` on ``<Class>``, e.g. ``slicer.app.testingEnabled()``; a
  slot whose first parameter is ``<Class>*``: an instance method of ``<Class>``).

Usage (mirrors made with the search tool's ``fetch``; Qt headers from Debian's ``qtbase5-dev``)::

    python Testing/Python/slicer_api/extract_api.py \\
        --slicer-git /work/.mirror/Slicer+Slicer/repo --tag v5.10.0 \\
        --ctk-git /work/.mirror/commontk+CTK/repo \\
        --qt-include /usr/include/x86_64-linux-gnu/qt5 \\
        --output Testing/Python/slicer_api/slicer_api_v5.10.0.json
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

# The classes the modules use (the conformance test fails, naming the class, when the code uses one that
# is missing here). Base classes are added by following each header's inheritance.
CLASSES = [
    # Qt
    "QWidget", "QPushButton", "QCheckBox", "QComboBox", "QLabel", "QProgressBar", "QTableWidget",
    "QTableWidgetItem", "QAbstractItemView", "QTimer", "QShortcut", "QKeySequence", "QFileDialog",
    "QPlainTextEdit", "QLineEdit", "QSpinBox", "QDoubleSpinBox", "QListWidget", "QSettings", "QGroupBox",
    "QFormLayout", "QMessageBox", "QCoreApplication", "QApplication", "QProcess", "QDir",
    # CTK
    "ctkCollapsibleButton", "ctkPathLineEdit", "ctkSliderWidget", "ctkCheckBox", "ctkComboBox",
    "ctkDoubleSpinBox", "ctkCheckablePushButton", "ctkDirectoryButton", "ctkSettingsPanel",
    # qMRML / qSlicer
    "qMRMLWidget", "qMRMLNodeComboBox", "qMRMLSegmentSelectorWidget", "qMRMLSegmentEditorWidget",
    "qMRMLSliceWidget", "qMRMLLayoutManager", "qSlicerLayoutManager", "qSlicerApplication",
    "qSlicerCoreApplication", "qMRMLSpinBox", "qMRMLSliderWidget", "qSlicerAbstractCoreModule",
    # MRML / vtkSlicer / segmentation core
    "vtkMRMLScene", "vtkMRMLNode", "vtkMRMLScalarVolumeNode", "vtkMRMLLabelMapVolumeNode",
    "vtkMRMLSegmentationNode", "vtkMRMLSegmentEditorNode", "vtkMRMLMarkupsNode",
    "vtkMRMLMarkupsFiducialNode", "vtkMRMLMarkupsROINode", "vtkMRMLMarkupsDisplayNode",
    "vtkMRMLInteractionNode", "vtkMRMLSelectionNode", "vtkMRMLSliceNode", "vtkMRMLTransformNode",
    "vtkMRMLSegmentationStorageNode", "vtkMRMLVolumeArchetypeStorageNode", "vtkMRMLTableNode",
    "vtkMRMLPlotChartNode", "vtkMRMLPlotSeriesNode", "vtkMRMLLayoutNode", "vtkMRMLApplicationLogic",
    "vtkSlicerApplicationLogic", "vtkSlicerSegmentEditorLogic", "vtkSlicerSegmentationsModuleLogic",
    "vtkSlicerMarkupsLogic", "vtkSlicerPlotsLogic", "vtkSlicerVolumesLogic", "vtkSegmentation",
    "vtkSegment", "vtkOrientedImageData", "vtkSegmentationConverter", "vtkMRMLSegmentationDisplayNode",
    "vtkMRMLDisplayNode", "vtkMRMLStorageNode", "vtkMRMLVolumeNode", "vtkMRMLDisplayableNode",
    "vtkMRMLTransformableNode", "vtkMRMLStorableNode",
]  # fmt: skip

QT_MODULES = ("QtCore", "QtGui", "QtWidgets")
ACCESS_RE = re.compile(
    r"^\s*(?:(public|protected|private)\s*(Q_SLOTS|slots)?|(Q_SIGNALS|signals))\s*:(?!:)\s*", re.S
)
VTK_MACRO_RE = re.compile(r"^(vtk(?:Get|Set)\w*Macro|vtkBooleanMacro|vtkTypeMacro|vtkMRMLNodeNewMacro)$")


def git_show(repo: Path, rev: str, path: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), "show", f"{rev}:{path}"], check=True, capture_output=True, text=True
    ).stdout


def git_headers(repo: Path, rev: str) -> dict[str, str]:
    """Header basename (without .h) -> path in the tree at ``rev`` (first path wins; Libs/Base/Modules first)."""
    names = subprocess.run(
        ["git", "-C", str(repo), "ls-tree", "-r", "--name-only", rev], check=True, capture_output=True, text=True
    ).stdout.split()
    result: dict[str, str] = {}
    for path in sorted((p for p in names if p.endswith(".h")), key=lambda p: ("Testing" in p, "Utilities" in p, p)):
        result.setdefault(Path(path).stem, path)
    return result


def ctk_commit_of(slicer_git: Path, tag: str) -> str:
    text = git_show(slicer_git, tag, "SuperBuild/External_CTK.cmake")
    match = re.search(r'Slicer_\$\{proj\}_GIT_TAG\s*"([0-9a-f]{40})"', text)
    if not match:
        raise SystemExit("could not read the CTK commit from SuperBuild/External_CTK.cmake")
    return match.group(1)


def strip_source(text: str) -> str:
    """Remove comments, preprocessor lines and string literals' content."""
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    text = re.sub(r"//[^\n]*", " ", text)
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', text)
    lines, skip = [], False
    for line in text.split("\n"):
        stripped = line.strip()
        if skip or stripped.startswith("#"):
            skip = stripped.endswith("\\")
            continue
        lines.append(line)
    return "\n".join(lines)


def matching(text: str, start: int, open_char: str, close_char: str) -> int:
    """Index just past the bracket that closes the one at ``start``."""
    depth = 0
    for index in range(start, len(text)):
        if text[index] == open_char:
            depth += 1
        elif text[index] == close_char:
            depth -= 1
            if depth == 0:
                return index + 1
    return len(text)


def find_class(text: str, name: str) -> tuple[list[str], str] | None:
    """(base class names, class body) of ``class [EXPORT] name [: bases] { ... }``."""
    pattern = re.compile(rf"\b(?:class|struct)\s+(?:\w+\s+)*?{name}\s*(?::([^{{;]*))?\{{")
    for match in pattern.finditer(text):
        bases = []
        base_text = re.split(r"\bclass\b", match.group(1) or "")[0]  # '#if' variants: the first one
        for base in base_text.split(","):
            base = re.sub(r"\b(public|protected|private|virtual)\b", "", base).strip()
            base = re.sub(r"<.*", "", base).strip()
            if base:
                bases.append(base.split("::")[-1])
        start = match.end() - 1
        end = matching(text, start, "{", "}")
        return bases, text[start + 1 : end - 1]
    return None


def normalize_type(text: str) -> str:
    text = re.sub(r"\b(const|virtual|static|inline|explicit|Q_INVOKABLE|VTK_NEWINSTANCE|QT_DEPRECATED|"
                  r"Q_DECL_CONSTEXPR|Q_REQUIRED_RESULT|Q_DECL_NOTHROW|constexpr|friend|typename)\b", " ", text)  # fmt: skip
    return re.sub(r"\s+", "", text)


def signature(name: str, params: str) -> str:
    """``name(type1,type2)`` as Qt normalises signal signatures (no names, defaults, const refs)."""
    types = []
    depth, current = 0, ""
    for char in params + ",":
        if char in "<(":
            depth += 1
        elif char in ">)":
            depth -= 1
        if char == "," and depth == 0:
            if current.strip() and current.strip() != "void" and "QPrivateSignal" not in current:
                types.append(current)
            current = ""
        else:
            current += char
    normalized = []
    for param in types:
        param = param.split("=")[0].strip()
        param = re.sub(r"\bconst\b", "", param)
        param = param.replace("&", " ").strip()
        tokens = re.findall(r"[A-Za-z_][\w:]*(?:<[^>]*>)?|\*", param)
        # Drop a trailing parameter name (an identifier following the type).
        if len(tokens) > 1 and re.match(r"^[A-Za-z_]\w*$", tokens[-1]) and tokens[-1] not in ("int", "double",
                                                                                            "bool", "float"):  # fmt: skip
            if not (len(tokens) == 2 and tokens[0] in ("unsigned", "signed", "long", "short")):
                tokens = tokens[:-1]
        normalized.append("".join(t if t == "*" else (" " + t) for t in tokens).strip().replace(" *", "*"))
    return f"{name}({','.join(normalized)})"


def split_statements(body: str):
    """Yield top-level statements of a class body, with function bodies and macro calls split off."""
    index, current = 0, ""
    while index < len(body):
        char = body[index]
        if char == "{":
            end = matching(body, index, "{", "}")
            yield current + body[index:end], True
            current = ""
            index = end
            if index < len(body) and body[index:].lstrip().startswith(";"):
                index = body.index(";", index) + 1
            continue
        if char == ";":
            yield current, False
            current, index = "", index + 1
            continue
        macro = re.match(r"(Q_[A-Z0-9_]+|QT_[A-Z0-9_]+|vtk\w*Macro|QVTK_OBJECT|Q_OBJECT)\b", body[index:])
        if macro and (index == 0 or not (body[index - 1].isalnum() or body[index - 1] == "_")):
            name = macro.group(1)
            after = index + macro.end()
            rest = body[after:]
            if name in ("Q_INVOKABLE", "Q_SLOTS", "Q_SIGNALS", "Q_DECL_CONSTEXPR", "Q_REQUIRED_RESULT",
                        "Q_DECL_NOTHROW", "Q_DECL_OVERRIDE", "Q_DECL_FINAL", "Q_DECL_NOEXCEPT"):  # fmt: skip
                current += name
                index = after
                continue
            if rest.lstrip().startswith("("):
                open_at = after + (len(rest) - len(rest.lstrip()))
                end = matching(body, open_at, "(", ")")
                if current.strip() and not ACCESS_RE.match(current):
                    yield current, False
                    current = ""
                label = ACCESS_RE.match(current)
                if label:
                    yield current, False
                    current = ""
                yield name + body[open_at:end], "macro"
                index = end
                if body[index:].lstrip().startswith(";"):
                    index = body.index(";", index) + 1
                continue
            index = after
            continue
        current += char
        index += 1
    if current.strip():
        yield current, False


def parse_class(bases: list[str], body: str, name: str, is_struct: bool = False) -> dict:
    info: dict = {
        "bases": bases, "methods": {}, "slots": [], "signals": [], "invokables": [],
        "properties": {}, "enums": [],
    }  # fmt: skip
    access, slots, signals = ("public" if is_struct else "private"), False, False
    for statement, kind in split_statements(body):
        while True:
            label = ACCESS_RE.match(statement)
            if not label:
                break
            if label.group(3):
                access, slots, signals = "public", False, True
            else:
                access, slots, signals = label.group(1), bool(label.group(2)), False
            statement = statement[label.end() :]
        text = statement.strip()
        if not text:
            continue
        if kind == "macro":
            macro = text.split("(", 1)[0]
            args = [a.strip() for a in text[len(macro) + 1 : -1].split(",")]
            if macro == "Q_PROPERTY":
                words = text[len(macro) + 1 : -1].split()
                for position, word in enumerate(words):
                    if word in ("READ", "WRITE", "NOTIFY", "MEMBER", "RESET", "DESIGNABLE", "STORED"):
                        info["properties"][words[position - 1].lstrip("*&")] = normalize_type(
                            " ".join(words[: position - 1])
                        )
                        break
            elif access == "public" and VTK_MACRO_RE.match(macro):
                if macro == "vtkBooleanMacro":
                    info["methods"][args[0] + "On"] = "void"
                    info["methods"][args[0] + "Off"] = "void"
                elif macro == "vtkTypeMacro":
                    for method, returned in (("GetClassName", "constchar*"), ("IsA", "int"),
                                             ("SafeDownCast", name + "*"), ("NewInstance", name + "*"),
                                             ("IsTypeOf", "int")):  # fmt: skip
                        info["methods"][method] = returned
                elif macro == "vtkMRMLNodeNewMacro":
                    info["methods"]["New"] = name + "*"
                else:
                    prefix = "Get" if macro.startswith("vtkGet") else "Set"
                    returned = normalize_type(args[1]) if prefix == "Get" and len(args) > 1 else "void"
                    if "Object" in macro or "SmartPointer" in macro:
                        returned += "*"
                    if "String" in macro:
                        returned = "char*"
                    info["methods"].setdefault(prefix + args[0], returned)
            continue
        if kind is True and re.match(r"^(enum|class|struct|union)\b", text):
            if text.startswith("enum") and access == "public":
                inner = text[text.index("{") + 1 : text.rindex("}")]
                for item in inner.split(","):
                    item = item.split("=")[0].strip()
                    if re.match(r"^[A-Za-z_]\w*$", item):
                        info["enums"].append(item)
            continue
        if access != "public" or re.match(r"^(typedef|using|friend|template|enum)\b", text):
            if text.startswith("enum") and access == "public" and "{" in text:
                pass
            continue
        declaration = text.split("{", 1)[0] if kind is True else text
        match = re.search(r"(~?\b[A-Za-z_]\w*|operator\s*\S+?)\s*\(", declaration)
        if not match:
            continue
        method = match.group(1)
        if method.startswith("~") or method.startswith("operator") or method == name:
            continue
        open_at = declaration.index("(", match.start())
        params = declaration[open_at + 1 : matching(declaration, open_at, "(", ")") - 1]
        returned = normalize_type(declaration[: match.start()])
        if signals:
            # moc makes one signature per number of defaulted arguments: clicked(bool = false) -> clicked(bool)
            # and clicked().
            full = signature(method, params)
            info["signals"].append(full)
            arguments = full[len(method) + 1 : -1].split(",") if full[len(method) + 1 : -1] else []
            for count in range(len(arguments) - params.count("="), len(arguments)):
                info["signals"].append(f"{method}({','.join(arguments[:count])})")
            continue
        info["methods"].setdefault(method, returned)
        if slots:
            info["slots"].append(method)
        if "Q_INVOKABLE" in declaration[: match.start()]:
            info["invokables"].append(method)
    info["slots"] = sorted(set(info["slots"]))
    info["invokables"] = sorted(set(info["invokables"]))
    info["signals"] = sorted(set(info["signals"]))
    info["enums"] = sorted(set(info["enums"]))
    return info


class HeaderSource:
    def __init__(self, slicer_git: Path, tag: str, ctk_git: Path, qt_include: Path) -> None:
        self.slicer_git, self.tag, self.ctk_git, self.qt_include = slicer_git, tag, ctk_git, qt_include
        self.ctk_commit = ctk_commit_of(slicer_git, tag)
        self.slicer_headers = git_headers(slicer_git, tag)
        self.ctk_headers = git_headers(ctk_git, self.ctk_commit)
        self._qt_index: dict[str, Path] | None = None

    def _qt_header(self, name: str) -> Path | None:
        for module in QT_MODULES:
            path = self.qt_include / module / f"{name.lower()}.h"
            if path.is_file() and re.search(rf"\bclass\s+\w+\s+{name}\b", path.read_text(errors="replace")):
                return path
        if self._qt_index is None:
            self._qt_index = {}
            for module in QT_MODULES:
                for path in sorted((self.qt_include / module).glob("q*.h")):
                    for found in re.findall(r"\bclass\s+Q_\w+_EXPORT\s+(\w+)\s*[:{]", path.read_text(errors="replace")):
                        self._qt_index.setdefault(found, path)
        return self._qt_index.get(name)

    def header(self, name: str) -> tuple[str, str, str] | None:
        """(kind, header path as cited, text) of a class."""
        if name.startswith("Q"):
            path = self._qt_header(name)
            if path is not None:
                return "qt", f"qt5/{path.parent.name}/{path.name}", path.read_text(errors="replace")
        if name.startswith("ctk") and name in self.ctk_headers:
            path = self.ctk_headers[name]
            return "ctk", f"CTK@{self.ctk_commit[:8]}:{path}", git_show(self.ctk_git, self.ctk_commit, path)
        if name in self.slicer_headers:
            path = self.slicer_headers[name]
            kind = "vtk" if name.startswith("vtk") else "qmrml"
            return kind, f"Slicer@{self.tag}:{path}", git_show(self.slicer_git, self.tag, path)
        return None


def decorator_members(text: str) -> dict[str, set[str]]:
    """Methods a PythonQt decorator header adds, per decorated class: each decorator class (a ``QObject`` whose public
    slots PythonQt adds to other classes) gives ``static_<Class>_<name>`` -> ``name`` on ``Class``; a slot whose first
    parameter is ``<Class>*`` -> an instance method of ``Class``; ``new_<Class>`` / ``delete_<Class>`` (constructors,
    destructors) are left out."""
    stripped = strip_source(text)
    result: dict[str, set[str]] = {}
    for match in re.finditer(r"\bclass\s+(?:\w+\s+)?(\w+)\s*:\s*public\s+QObject\b", stripped):
        parsed = find_class(stripped, match.group(1))
        if parsed is None:
            continue
        bases, body = parsed
        for slot in parse_class(bases, body, match.group(1))["slots"]:
            static = re.match(r"static_([A-Za-z][A-Za-z0-9]*)_(\w+)$", slot)
            if static:
                result.setdefault(static.group(1), set()).add(static.group(2))
                continue
            if slot.startswith(("new_", "delete_")):
                continue
            first = re.search(rf"\b{slot}\s*\(\s*(?:const\s+)?(\w+)\s*\*", body)
            if first:
                result.setdefault(first.group(1), set()).add(slot)
    return result


def pythonqt_decorators(slicer_git: Path, tag: str) -> dict[str, set[str]]:
    """:func:`decorator_members` of every ``*PythonQtDecorators.h`` in Slicer's tree at ``tag``."""
    names = subprocess.run(
        ["git", "-C", str(slicer_git), "ls-tree", "-r", "--name-only", tag], check=True, capture_output=True, text=True
    ).stdout.split()
    result: dict[str, set[str]] = {}
    for path in sorted(p for p in names if p.endswith("PythonQtDecorators.h")):
        for cls, members in decorator_members(git_show(slicer_git, tag, path)).items():
            result.setdefault(cls, set()).update(members)
    return result


def extract(source: HeaderSource, roots: list[str]) -> dict:
    classes: dict[str, dict] = {}
    external: set[str] = set()
    queue = list(roots)
    while queue:
        name = queue.pop(0)
        if name in classes or name in external:
            continue
        found = source.header(name)
        if found is None:
            external.add(name)
            continue
        kind, path, text = found
        parsed = find_class(strip_source(text), name)
        if parsed is None:
            external.add(name)
            continue
        bases, body = parsed
        info = parse_class(bases, body, name)
        info["kind"] = kind
        info["header"] = path
        classes[name] = info
        queue.extend(b for b in bases if b not in classes)
    return {"classes": dict(sorted(classes.items())), "external_bases": sorted(external)}


GUI_CONNECTORS = "Base/Python/slicer/parameterNodeWrapper/guiConnectors.py"


def _names(node) -> list[str]:
    """``qt.QCheckBox`` / ``(qt.QCheckBox, ctk.ctkCheckBox)`` / ``bool`` / ``pathlib.Path`` -> names."""
    import ast

    items = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
    return [i.attr if isinstance(i, ast.Attribute) else i.id for i in items if isinstance(i, (ast.Attribute, ast.Name))]


def gui_connectors(slicer_git: Path, tag: str) -> list[dict]:
    """What ``parameterNodeWrapper``'s GUI connectors accept: per connector, the exact widget classes
    (``type(widget) == X`` / ``in (...)``), the parameter types (``unannotatedType(datatype) == T`` / ``in``;
    ``node`` for ``isNodeOrUnionOfNodes``, ``enum`` for Enum subclasses, ``pack`` for parameter packs) and
    whether ``create`` demands a ``Choice`` annotation."""
    import ast

    tree = ast.parse(git_show(slicer_git, tag, GUI_CONNECTORS))
    result = []
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        methods = {f.name: f for f in cls.body if isinstance(f, ast.FunctionDef)}
        if "canRepresent" not in methods:
            continue
        widgets, types = [], []
        for node in ast.walk(methods["canRepresent"]):
            if isinstance(node, ast.Compare) and isinstance(node.left, ast.Call) and isinstance(node.left.func, ast.Name):
                target = _names(node.comparators[0])
                if node.left.func.id == "type":
                    widgets += target
                elif node.left.func.id == "unannotatedType":
                    types += target
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                if node.func.id == "isNodeOrUnionOfNodes":
                    types.append("node")
                elif node.func.id == "issubclass" and "Enum" in ast.unparse(node):
                    types.append("enum")
            if isinstance(node, ast.Attribute) and node.attr == "isParameterPack":
                types.append("pack")
        create = ast.unparse(methods.get("create", methods["canRepresent"]))
        result.append({"connector": cls.name, "widgets": sorted(set(widgets)), "types": sorted(set(types)),
                       "needs_choice": "validators.Choice" in create})  # fmt: skip
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slicer-git", type=Path, required=True, help="git directory of a Slicer/Slicer mirror")
    parser.add_argument("--tag", default="v5.10.0", help="Slicer release tag (the minimum supported version)")
    parser.add_argument("--ctk-git", type=Path, required=True, help="git directory of a commontk/CTK mirror")
    parser.add_argument("--qt-include", type=Path, required=True, help="Qt 5.15 include folder (QtCore, QtGui, QtWidgets)")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    source = HeaderSource(args.slicer_git, args.tag, args.ctk_git, args.qt_include)
    qt_version = re.search(
        r'QT_VERSION_STR\s+"([^"]+)"', (args.qt_include / "QtCore" / "qconfig.h").read_text()
    )
    listing = {
        "slicer_tag": args.tag,
        "slicer_commit": subprocess.run(["git", "-C", str(args.slicer_git), "rev-list", "-n", "1", args.tag],
                                        check=True, capture_output=True, text=True).stdout.strip(),  # fmt: skip
        "ctk_commit": source.ctk_commit,
        "qt_version": qt_version.group(1) if qt_version else "unknown",
        "generated_by": "Testing/Python/slicer_api/extract_api.py",
        "parameter_node_connectors": gui_connectors(args.slicer_git, args.tag),
        **extract(source, CLASSES),
    }
    for cls, members in pythonqt_decorators(args.slicer_git, args.tag).items():
        if cls in listing["classes"]:
            listing["classes"][cls]["decorators"] = sorted(members)
    args.output.write_text(json.dumps(listing, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    missing = [c for c in CLASSES if c not in listing["classes"]]
    print(f"{len(listing['classes'])} classes written to {args.output}; not found: {missing or 'none'}")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
