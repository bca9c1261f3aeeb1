"""bench/profile_step.py's reading of a profiler trace: what the GPU waited on."""

from bench.profile_step import BETWEEN_PHASES, busy_fraction, idle_by_phase, phase_detail


def host(name, ts, dur):
    return {"name": name, "ph": "X", "cat": "user_annotation", "ts": ts, "dur": dur}


def kernel(ts, dur):
    return {"name": "k", "ph": "X", "cat": "kernel", "ts": ts, "dur": dur}


def test_gpu_idle_time_is_charged_to_the_innermost_host_phase_open_meanwhile():
    # One search of 100 us: the host is in w2s.large (0-60) with w2s.large.read inside it
    # (40-60), then w2s.select (70-90); kernels run 0-30 and 45-50 and 85-100.
    device = [kernel(0, 30), kernel(45, 5), kernel(85, 15)]
    trace = {"traceEvents": [
        host("w2s_search", 0, 100), host("w2s.large", 0, 60), host("w2s.large.read", 40, 20),
        host("w2s.select", 70, 20),
        # the device-side copy of an annotation is not a host phase
        {"name": "w2s.large", "ph": "X", "cat": "gpu_user_annotation", "ts": 30, "dur": 10},
        *device]}
    idle = idle_by_phase(trace, "w2s_search", device)
    assert idle == {"w2s.large": 10, "w2s.large.read": 15, BETWEEN_PHASES: 10,
                    "w2s.select": 15}
    assert sum(idle.values()) == 100 - 30 - 5 - 15


def test_a_gpu_busy_all_along_waits_on_nothing():
    device = [kernel(0, 60), kernel(50, 50)]      # overlapping kernels cover the search
    trace = {"traceEvents": [host("w2s_search", 0, 100), host("w2s.score", 10, 20), *device]}
    assert idle_by_phase(trace, "w2s_search", device) == {}


def launch(ts):
    return {"name": "cudaLaunchKernel", "ph": "X", "cat": "cuda_runtime", "ts": ts, "dur": 1}


def test_a_phase_is_described_per_occurrence_by_its_host_time_launches_device_work_and_waits():
    # w2s.prefill twice (0-40, 60-80), launching 3 and 1 kernels; the device works 10-30 and
    # 70-100 (10 us of it inside the second prefill); a launch outside any prefill at 50.
    device = [kernel(10, 20), kernel(70, 30)]
    trace = {"traceEvents": [
        host("w2s_search", 0, 100), host("w2s.prefill", 0, 40), host("w2s.prefill", 60, 20),
        launch(5), launch(8), launch(30), launch(50), launch(65), *device]}
    trace["traceEvents"].append({"name": "cudaStreamSynchronize", "ph": "X",
                                 "cat": "cuda_runtime", "ts": 31, "dur": 8})
    assert phase_detail(trace, device, "w2s.prefill") == {
        "occurrences": 2, "host_ms": 0.03, "launches": 2.0, "device_busy_ms": 0.015,
        "runtime_ms": {"cudaStreamSynchronize": 0.004, "cudaLaunchKernel": 0.002}}
    assert phase_detail(trace, device, "w2s.select") is None


def test_the_busy_fraction_is_of_the_host_span_not_its_device_side_copy():
    # The profiler's device-side copy of the search's annotation (20 us of kernels) comes
    # first in the trace; the search itself took 100 us, busy 30 of them.
    trace = {"traceEvents": [
        {"name": "w2s_search", "ph": "X", "cat": "gpu_user_annotation", "ts": 10, "dur": 20},
        host("w2s_search", 0, 100), kernel(10, 20), kernel(50, 10)]}
    busy, wall, device = busy_fraction(trace, "w2s_search")
    assert wall == 100 and busy == 0.3 and len(device) == 2
