"""Issue 15 (faults): ``kill -9`` of the LiverSAM server during a propagation job. The module's connection says
so once (no wait on a dead server at every click), offers a restart (Connect), and a restart works; the job's
result never reaches the scene, so the segmentation is unchanged."""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import pytest

from slicer_harness import MODULE_DIR, ensure_module_on_path, shared_data_dir

ensure_module_on_path()

from liversam.ct_io import read_ct  # noqa: E402
from LiverSAMLib.ServerClient import ServerUnavailable, box_ijk, segment_spec  # noqa: E402
from LiverSAMLib.ServerConnection import FAILED, LOCAL, READY, STOPPED, ServerConnection, ServerSettings  # noqa: E402

K, BOX = 33, (12.0, 20.0, 115.0, 110.0)  # a loose liver box on lits117 slice 33 (IJK)


def _open(client, volume) -> str:
    g = volume.geometry
    return client.open_volume(volume.array_kji, g.spacing_mm, g.origin_lps, g.direction_lps.ravel())["session_id"]


def test_server_killed_mid_propagation_is_reported_once_and_restarts():
    os.environ.setdefault("LIVERSAM_SERVER_PYTHONPATH", str(MODULE_DIR))
    volume = read_ct(shared_data_dir() / "lits117" / "ct.nii.gz")
    connection = ServerConnection(ServerSettings(mode=LOCAL, python=sys.executable, model="litemedsam", device="cpu"),
                                  startup_timeout_s=180)  # fmt: skip
    try:
        client = connection.connect()
        session = _open(client, volume)
        job = client.start_propagation(session, [segment_spec("liver", 1, boxes_ijk=[box_ijk(*BOX, K)])])
        deadline = time.monotonic() + 300
        while client.job_status(job).get("done", 0) < 2:  # the job is under way (a few slices done)
            assert time.monotonic() < deadline, "the propagation job did not start"
            time.sleep(0.1)
        server_process = connection._process.process
        server_process.kill()  # kill -9
        server_process.wait(timeout=30)

        with pytest.raises(ServerUnavailable) as raised:
            client.job_status(job)
        connection.lost(raised.value)  # what the module does with a ServerUnavailable while READY
        assert connection.state == FAILED and connection.client is None
        assert "stopped answering" in connection.message and "exited with code -9" in connection.message
        assert "Press Connect" in connection.message and "not changed" in connection.message
        started = time.monotonic()
        with pytest.raises(ServerUnavailable, match="stopped answering"):
            connection.ensure()  # every later click gets the reason at once, no new server, no waiting
        assert time.monotonic() - started < 1.0 and not connection.started_here

        connection.reset()  # the Connect button
        assert connection.state == STOPPED
        client = connection.ensure()  # a new server
        assert connection.state == READY and connection.started_here
        session = _open(client, volume)
        mask, score = client.predict_slice(session, K, boxes_ij=[BOX])
        assert mask.sum() > 5000 and score > 0.5  # lits117's liver on slice 33 is ~9,700 px
        assert np.asarray(mask).shape == (128, 128)
    finally:
        connection.stop()
