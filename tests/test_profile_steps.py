"""benchmarks/profile_steps.py's reading of a trace: only the device's own stream lines count,
overlapping kernels count once towards busy time, and per-step figures divide by the steps."""
import gzip
import json
import os
import sys

import pytest

from cli import REPO

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import profile_steps  # noqa: E402


def metadata(pid, name, tid=None):
  event = {"ph": "M", "pid": pid, "name": "process_name" if tid is None else "thread_name",
           "args": {"name": name}}
  return event if tid is None else {**event, "tid": tid}


def kernel(name, ts, dur, pid=1, tid=14):
  return {"ph": "X", "pid": pid, "tid": tid, "ts": ts, "dur": dur, "name": name}


GPU_TRACE = [
    metadata(1, "/device:GPU:0"), metadata(1, "Stream #14(Compute)", 14),
    metadata(1, "XLA Ops", 15), metadata(701, "/host:CPU"), metadata(701, "python3", 1),
    # two steps on the stream: a convolution, an overlapping fusion, a copy, an idle gap
    kernel("sm90_xmma_fprop_implicit_gemm_tf32f32", 0, 60),
    kernel("loop_add_fusion_3", 50, 20),
    kernel("Memcpy DtoD", 100, 10),
    kernel("sm90_xmma_fprop_implicit_gemm_tf32f32", 200, 60),
    kernel("loop_convert_fusion_7", 260, 30),
    # the same ops again on a derived line, and host work: neither is device time
    kernel("convolution.1", 0, 60, tid=15), kernel("PjitFunction(step)", 0, 500, 701, 1),
]


def test_only_the_device_streams_count_and_overlaps_count_once(tmp_path):
  path = tmp_path / "plugins" / "profile" / "run"
  path.mkdir(parents=True)
  with gzip.open(path / "perfetto_trace.json.gz", "wt") as f:
    json.dump({"traceEvents": GPU_TRACE}, f)
  kernels, lines = profile_steps.device_kernels(profile_steps._load_trace(str(tmp_path)))
  assert sorted(set(lines.values())) == ["Stream #14(Compute)"]
  assert len(kernels) == 5
  summary = profile_steps.summarize_kernels(kernels, steps=2)
  # busy: [0, 70) + [100, 110) + [200, 290) = 170 us over a 290 us window
  assert summary["device_busy_ms_per_step"] == pytest.approx(0.085)
  assert summary["kernel_ms_per_step"] == pytest.approx(0.09)  # 180 us of kernels
  assert summary["device_idle_fraction_of_window"] == pytest.approx(1 - 170 / 290, abs=1e-4)
  assert summary["kernel_ms_per_step_by_kind"] == {
      "convolution_or_matmul": 0.06, "fused_elementwise_or_reduction": 0.025, "copy": 0.005}
  assert summary["tf32_kernel_share"] == pytest.approx(120 / 180, abs=1e-4)
  top = summary["top_kernels"][0]
  assert (top["per_step"], top["ms_per_step"]) == (1.0, 0.06)


def test_a_cpu_trace_falls_back_to_the_xla_threads():
  events = [metadata(701, "/host:CPU"), metadata(701, "python3", 1),
            metadata(701, "tf_XLAEigen/123", 2),
            kernel("fusion.1", 0, 5, 701, 2), kernel("PjitFunction(step)", 0, 9, 701, 1)]
  kernels, lines = profile_steps.device_kernels(events)
  assert [k["name"] for k in kernels] == ["fusion.1"]
  assert list(lines.values()) == ["tf_XLAEigen/123"]
