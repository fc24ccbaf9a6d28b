"""What the server tells token holders: messages without the file paths of the server's machine.

Every token holder reads the server's answers (model descriptions, the model's load error, job errors, error
details); none of them should learn the server's user names, folders or where its weights and caches lie. An absolute
path in such a text is replaced by its file name ("/home/alice/my runs/a b/best.pt" -> "best.pt"), a path in LiverSAM's
own folders by the folder's documented name ("~/.liversam/models/sam_vit_b_01ec64.pth", "$LIVERSAM_HOME/models/...")
so that the advice "put it at ..." still says where, and "/path/to/..." (a placeholder in advice) is kept. The full
text goes to the server's log where the caller logs it.

A path is found when it starts with ``/``, ``~/``, a drive (``C:\\``, ``C:/``) or ``\\\\host``, not inside a word or a
URL (``https://...``; a ``file://`` URL's path is a path). Its end: a quoted path ('...' or "...", as LiverSAM's messages
quote paths) runs to its closing quote, spaces included; an unquoted one stops at a space unless what follows the
space is more of the path, which is told when the following words each hold a path separator and end in a known file
suffix (.pt, .pth, .nii.gz, ...: "/home/alice/my runs/a b/best.pt", "/home/alice/My Scans/ct 1.nii.gz") or no other
word follows them (the end of the text or line, "; ", ")": "/srv/runs/run 7/out"), or when the extended text's last
word holds a separator and ends in a known file suffix ("/srv/case 1 b/ct.nii.gz"). So the words after a path are not
taken for more of it ("/home/alice/data on 2024/05/01" and "/home/alice/data and/or more" stop after "data"); when it
cannot be told, a path's tail is left ("/srv/runs/a b c/out is gone" gives "a b c/out is gone"): it names no user.
A home folder alone (``/home/alice``, ``/Users/alice``, ``C:\\Users\\alice``) becomes "(a folder)", not its user's
name, and the user name of a home folder may hold spaces: "/home/alice smith/x" and "C:\\Users\\Anna van Dijk\\x" (a
Windows profile's name: up to 4 words) are one path.
"""

from __future__ import annotations

import errno
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path, PurePosixPath, PureWindowsPath

from ..errors import InputImageError, LiverSAMError

log = logging.getLogger(__name__)

_ROOT = r"(?:[A-Za-z]:[\\/]|\\\\|~[\\/]|/)"  # C:\ or C:/, \\host\share, ~/, /
_PATH_CHAR = r"[^\s;,'\"()<>]"
# not inside a word, a path, a variable ("$LIVERSAM_HOME/models", "%LIVERSAM_HOME%\models"); URLs: see _URL
_NOT_AFTER = r"(?<![\w/\\.~$%-])"
_CANDIDATE = re.compile(
    rf"{_NOT_AFTER}(?P<quote>['\"])(?P<quoted>{_ROOT}[^\n]*?)(?P=quote)(?!\w)"  # '/a b/c.pt' (closing quote: no word after)
    rf"|{_NOT_AFTER}(?P<plain>{_ROOT}{_PATH_CHAR}+)"
)
# a URL ("https://example.org/a/b.pth") is no path of the server's machine; a file:// URL's path is one
_URL = re.compile(r"(?<![\w+.-])(?!file:)[A-Za-z][\w+.-]*://[^\s'\"<>()]*", re.IGNORECASE)
_MORE = re.compile(rf" +{_PATH_CHAR}+")  # the next word after a space
_STARTS_PATH = re.compile(rf"{_ROOT}{_PATH_CHAR}")
_SEPARATOR = re.compile(r"[\\/]")
_PUNCTUATION = ".:!?"  # ending an unquoted path: the sentence's ("cannot write to /home/alice: Permission denied")
# a home folder alone: its name is its user's (a file:// URL's path may start with more slashes)
_HOME_FOLDER = re.compile(r"[\\/]*(?:[A-Za-z]:)?[\\/]+(?:home|Users)[\\/]+[^\\/]+[\\/]*", re.IGNORECASE)
# a Windows profile folder, whose name may hold spaces ("C:\Users\Alice Smith"): more words are looked at after it
_WINDOWS_PROFILE = re.compile(r"[A-Za-z]:[\\/]Users[\\/][^\\/]+", re.IGNORECASE)
_PROFILE_WORDS = 3  # a profile name of up to this many more words ("C:\Users\Anna Maria van Dijk\...")
#: file suffixes that end a path with spaces in it (checkpoints, exported encoders, configs, images)
KNOWN_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors", ".onnx", ".xml", ".json", ".yaml", ".yml", ".txt",
                  ".csv", ".h5", ".npy", ".npz", ".nii.gz", ".nii", ".nrrd", ".seg.nrrd", ".mha", ".mhd", ".dcm",
                  ".zip", ".lock", ".log")
# kept as they are: a placeholder in advice ("give its path as --model sam_vit_b=/path/to/sam_vit_b_01ec64.pth"), the
# server's own API ("DELETE /v1/sessions/{id}") and LiverSAM's documented folders written with "~" (they name no user)
_PLACEHOLDER = ("/path/to/", "/v1/", "~/.liversam/", "~/.cache/liversam/", "~\\.liversam\\", "~\\.cache\\liversam\\")
_DOCUMENTED = ("~/.liversam", "~/.cache/liversam", "~\\.liversam", "~\\.cache\\liversam")
_MAX_WORDS = 32  # an unquoted path is extended over at most this many spaces


class ServerStorageError(LiverSAMError):
    """The server cannot write its own temporary files (full disk, no permission): 503 with a message that names no
    folder of the server's machine (its log names it); nothing the client can change in its request."""


#: errors of the server's machine met reading a client's file (no space, no memory, too many open files, a disk's I/O
#: error): nothing the client can change. Any other (missing, vanished, not readable, a folder where a file was
#: expected) is the file's, which the client, or who keeps those files, can fix
SERVER_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.ENOMEM, errno.EMFILE, errno.ENFILE, errno.EIO,
                           errno.EROFS, errno.EAGAIN, errno.EBUSY})


def input_file_error(exc: OSError, what: str, advice: str) -> LiverSAMError:
    """The error to answer for an ``OSError`` met reading a client's input ``what`` (its path as the client gave it,
    e.g. "CT 'case1/ct'"), logged in full here: an :class:`InputImageError` (422) saying what is wrong with which
    file and what to do (``advice``), when the file is the problem (missing, vanished, not readable, a folder where a
    file was expected, ...); a :class:`ServerStorageError` (503) naming no path of the server's machine when the
    server's machine is (:data:`SERVER_ERRNOS`). The file named in a 422 is filtered as every 422 is (the server's
    ``client_text``: paths under the data roots stay)."""
    log.warning("%s: %s", what, exc)
    if exc.errno in SERVER_ERRNOS:
        return ServerStorageError(
            f"The server cannot read {what} ({exc.strerror or type(exc).__name__}). This is a problem of the server's "
            "machine, not of the request: its administrator can look into it (the server's log has the full error); "
            "then try again."
        )
    where = f" ('{exc.filename}')" if exc.filename is not None else ""
    if exc.errno in (errno.EACCES, errno.EPERM):
        why = (f"permission denied{where}: the server's user must be able to read the file and to open (search) every "
               "folder above it")
    elif exc.errno == errno.ENOENT:
        why = f"a file of it vanished while the server read it{where}: it was deleted or moved meanwhile"
    elif exc.errno == errno.ENOTDIR:
        why = f"a folder of it is no longer a folder{where}: it was replaced meanwhile"
    elif exc.errno == errno.EISDIR:
        why = f"a folder stands where a file was expected{where}"
    else:
        why = f"{exc.strerror or exc}{where}"
    return InputImageError(f"{what[:1].upper()}{what[1:]} cannot be read: {why}. {advice}")


def _file_name(path: str) -> str:
    if _HOME_FOLDER.fullmatch(path.rstrip(_PUNCTUATION)):
        return "(a folder)" + path[len(path.rstrip(_PUNCTUATION)):]  # not its user's name
    windows = "\\" in path or path[1:2] == ":"
    name = (PureWindowsPath(path) if windows else PurePosixPath(path)).name
    return name or "(a folder)"


def _has_known_suffix(path: str) -> bool:
    return path.rstrip(".").lower().endswith(KNOWN_SUFFIXES)


def _next_word(text: str, position: int) -> re.Match | None:
    """The word after ``position`` (past spaces) if it can be more of a path: not one that begins another path."""
    word = _MORE.match(text, position)
    if word is None or _STARTS_PATH.match(word.group(0).lstrip(" ")):
        return None
    return word


def _unquoted_end(text: str, start: int, end: int) -> int:
    """Where the unquoted path found at ``text[start:end]`` (up to its first space) really ends: further words are
    part of it only when the path can be told to go on (see the module's notes). When unsure, it ends: a path's tail
    left in the text names no user, words taken for a path are lost to the reader."""
    if _has_known_suffix(text[start:end]) or text[end - 1] in _PUNCTUATION:
        return end  # a file, or the sentence goes on after it ("cannot write to /home/alice: Permission denied/...")
    if _HOME_FOLDER.fullmatch(text, start, end):  # "/home/alice smith/x", "C:\\Users\\Alice Smith\\data": the user name's
        # words up to one that goes on with the path (a Windows profile's name has more often spaces than a user's)
        separator = "\\" if "\\" in text[start:end] else "/"
        position = end
        for _ in range(_PROFILE_WORDS if _WINDOWS_PROFILE.fullmatch(text, start, end) else 1):
            word = _next_word(text, position)
            if word is None:
                break
            position = word.end()
            if separator in word.group(0):
                end = position
                break
    # following words that each hold a separator go on with the path when they end in a known file suffix
    # ("/home/alice/my runs/a b/best.pt", "/home/alice/My Scans/ct 1.nii.gz") or no other word follows them (the
    # text's or line's end, "; ", ")": "/srv/runs/run 7/out"); not when a word follows ("/home/alice/data and/or
    # more": "and/or" is no folder)
    position = end
    while (word := _next_word(text, position)) is not None:
        if not _SEPARATOR.search(word.group(0)):
            if position > end and _has_known_suffix(text[start:word.end()]):
                return word.end()  # the file's name after its folders ("ct 1.nii.gz")
            break
        position = word.end()
        if _has_known_suffix(text[start:position]):
            return position
    if position > end and _next_word(text, position) is None:
        return position
    # or the words up to one holding a separator and ending in a known file suffix ("/srv/case 1 b/ct.nii.gz")
    position = end
    for _ in range(_MAX_WORDS):
        word = _next_word(text, position)
        if word is None:
            break
        position = word.end()
        if _SEPARATOR.search(word.group(0)) and _has_known_suffix(text[start:position]):
            return position
    return end


def _is_under(path: str, folder: str) -> bool:
    folder = folder.rstrip("/\\")
    return bool(folder) and (path == folder or path.startswith((folder + "/", folder + "\\")))


def _named_folders() -> list[tuple[str, str]]:
    """(folder of this machine, the name the docs give it) for LiverSAM's own folders: the advice in a message (put
    the weights in the models folder, make the cache writable) keeps saying where without naming the server's user."""
    home = os.environ.get("LIVERSAM_HOME")
    models = Path(home) / "models" if home else Path.home() / ".liversam" / "models"
    folders = [(str(models), "$LIVERSAM_HOME/models" if home else "~/.liversam/models")]
    if os.environ.get("LIVERSAM_CACHE_DIR"):
        folders.append((os.environ["LIVERSAM_CACHE_DIR"], "$LIVERSAM_CACHE_DIR"))
    return folders


def _public_path(path: str, keep: tuple[str, ...]) -> str:
    if path.startswith(_PLACEHOLDER) or path.rstrip(_PUNCTUATION) in _DOCUMENTED or any(
            _is_under(path, folder) for folder in keep):
        return path
    for folder, name in _named_folders():
        if _is_under(path, folder):
            rest = path[len(folder.rstrip("/\\")):].replace("\\", "/")
            return name + rest
    return _file_name(path)


def path_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of each absolute path in ``text`` (see the module's notes), in order."""
    urls = [url.span() for url in _URL.finditer(text)]
    spans: list[tuple[int, int]] = []
    position = 0
    while (found := _CANDIDATE.search(text, position)) is not None:
        if any(url_start <= found.start() < url_end for url_start, url_end in urls):
            position = found.start() + 1  # inside a URL: no path
            continue
        if found.group("quoted") is not None:
            spans.append(found.span("quoted"))
            position = found.end()
        else:
            start, end = found.span("plain")
            end = _unquoted_end(text, start, end)
            position = end
            while end - start > 1 and text[end - 1] in _PUNCTUATION and text[end - 2] not in "/\\.":
                end -= 1  # the sentence's: not the path's ("/home/alice: Permission denied")
            spans.append((start, end))
    return spans


def public_text(text: str | None, keep: Iterable[str | os.PathLike] = ()) -> str | None:
    """``text`` with every absolute path of the server's machine replaced by its file name (LiverSAM's own folders by
    their documented names); paths under a folder of ``keep`` (the data roots a client may open) stay as they are."""
    if not text:
        return text
    kept = tuple(str(folder) for folder in keep)
    pieces, last = [], 0
    for start, end in path_spans(text):
        pieces += [text[last:start], _public_path(text[start:end], kept)]
        last = end
    return "".join(pieces) + text[last:]


# descriptions written by LiverSAM before GET /v1/models existed held the checkpoint's absolute path
_OLD_DESCRIPTION = re.compile(
    r"^(LiverSAMTrain model |trained model )((?:[A-Za-z]:[\\/]|\\\\|/).+?)(; validation Dice [0-9.]+)?$", re.DOTALL
)


def public_description(text: str) -> str:
    """A model's description as GET /v1/models gives it to token holders: absolute paths of the server's machine
    (older LiverSAM versions wrote "LiverSAMTrain model /home/alice/runs/a/best.pt; validation Dice 0.912" or "trained
    model /path") replaced by the file's name."""
    old = _OLD_DESCRIPTION.match(text)
    if old:
        return old.group(1) + _file_name(old.group(2).strip()) + (old.group(3) or "")
    return public_text(text) or text


def public_model_name(model: str) -> str:
    """The server's ``--model`` as the API names it: a checkpoint file given by its path is named by its file name
    (``sam_vit_b=/home/alice/w.pth`` by ``sam_vit_b=w.pth``)."""
    name, equals, path = model.partition("=")
    if equals and path and not _SEPARATOR.search(name):
        return f"{name}={public_model_name(path)}"
    return _file_name(model) if (_SEPARATOR.search(model) or Path(model).suffix) else model


__all__ = ["KNOWN_SUFFIXES", "SERVER_ERRNOS", "ServerStorageError", "input_file_error", "path_spans", "public_description",
           "public_model_name", "public_text"]
