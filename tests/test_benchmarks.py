"""benchmarks/bound.py's bookkeeping: kernel categories, medians over rounds, saved-for-backward bytes, one CPU run."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bound
import kernel_categories as kc

#: kernel names as an H100 profile prints them (torch 2.x, cuBLAS 12), and aten ops as a CPU profile does
NAMES = {
    "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel__5x_cublas": kc.GEMM,
    "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNT": kc.GEMM,
    "void cublasLt::splitKreduce_kernel<32, 16, int, float, __nv_bfloat16, float, __nv_bfloat16, true, false, false>(cublasLt::cublasSplitKParams<float>, float const*, __nv_bfloat16 const*, __nv_bfloat16*, float const*, float const*, __nv_bfloat16 const*, float const*, __nv_bfloat16*, void*, long, float*, int*)": kc.GEMM,
    "void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x1_tn_align8>(cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x1_tn_align8::Params)": kc.GEMM,
    "triton_tem_fused_mm_0": kc.GEMM,
    "void at::native::vectorized_elementwise_kernel<4, at::native::bfloat16_copy_kernel_cuda(at::TensorIteratorBase&)::{lambda()#2}::operator()() const::{lambda()#8}::operator()() const::{lambda(float)#1}, std::array<char*, 2ul> >(int, at::native::bfloat16_copy_kernel_cuda(at::TensorIteratorBase&)::{lambda()#2}::operator()() const::{lambda()#8}::operator()() const::{lambda(float)#1}, std::array<char*, 2ul>)": kc.COPIES,
    "void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)::{lambda()#3}::operator()() const::{lambda()#7}::operator()() const::{lambda(float)#1}, std::array<char*, 2ul>, 4, TrivialOffsetCalculator<1, unsigned int>, TrivialOffsetCalculator<1, unsigned int>, at::native::memory::LoadWithCast<1>, at::native::memory::StoreWithCast<1> >(int, at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)::{lambda()#3}::operator()() const::{lambda()#7}::operator()() const::{lambda(float)#1}, std::array<char*, 2ul>, TrivialOffsetCalculator<1, unsigned int>, TrivialOffsetCalculator<1, unsigned int>, at::native::memory::LoadWithCast<1>, at::native::memory::StoreWithCast<1>)": kc.COPIES,
    "void at::native::(anonymous namespace)::CatArrayBatchedCopy<at::native::(anonymous namespace)::OpaqueType<2u>, unsigned int, 3, 128, 1>(at::native::(anonymous namespace)::OpaqueType<2u>*, at::native::(anonymous namespace)::CatArrInputTensorMetadata<at::native::(anonymous namespace)::OpaqueType<2u>, unsigned int, 128, 1>, at::native::(anonymous namespace)::TensorSizeStride<unsigned int, 4u>, int, unsigned int)": kc.COPIES,
    "Memcpy DtoD (Device -> Device)": kc.COPIES,
    "triton_poi_fused__to_copy_3": kc.COPIES,
    "void at::native::(anonymous namespace)::fused_dropout_kernel_vec<c10::BFloat16, float, unsigned int, 1, 4, bool>(at::cuda::detail::TensorInfo<c10::BFloat16 const, unsigned int>, at::cuda::detail::TensorInfo<c10::BFloat16, unsigned int>, at::cuda::detail::TensorInfo<bool, unsigned int>, unsigned int, float, at::PhiloxCudaState)": kc.DROPOUT,
    "triton_poi_fused_native_dropout_2": kc.DROPOUT,
    "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::func_wrapper_t<float, at::native::sum_functor<float, float, float>::operator()(at::TensorIterator&)::{lambda(float, float)#1}>, unsigned int, float, 4, 4> >(at::native::ReduceOp<float, at::native::func_wrapper_t<float, at::native::sum_functor<float, float, float>::operator()(at::TensorIterator&)::{lambda(float, float)#1}>, unsigned int, float, 4, 4>)": kc.REDUCTIONS,
    "void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, float, float, at::native::(anonymous namespace)::LogSoftMaxForwardEpilogue>(float*, float const*, int)": kc.REDUCTIONS,
    "void at::native::(anonymous namespace)::nll_loss_forward_reduce_cuda_kernel_2d<float, float, long>(float*, float*, float const*, long const*, float const*, bool, long, long, long, long)": kc.REDUCTIONS,
    "triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_1": kc.REDUCTIONS,
    "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::TensorListMetadata<4>, at::native::(anonymous namespace)::FusedAdamMathFunctor<float, 4, (at::native::ADAM_MODE)1, false>, double, float*, double, double, double, double, double, double, bool, float*, float*>(at::native::(anonymous namespace)::TensorListMetadata<4>, at::native::(anonymous namespace)::FusedAdamMathFunctor<float, 4, (at::native::ADAM_MODE)1, false>, double, float*, double, double, double, double, double, double, bool, float*, float*)": kc.OPTIMIZER,
    "void pytorch_flash::flash_fwd_kernel<pytorch_flash::Flash_fwd_kernel_traits<64, 128, 128, 4, false, false, cutlass::bfloat16_t, pytorch_flash::Flash_kernel_traits<64, 128, 128, 4, cutlass::bfloat16_t> >, false, true, false, false, true, true, false, false>(pytorch_flash::Flash_fwd_params)": kc.ATTENTION,
    "fmha_cutlassB_bf16_aligned_64x64_k64_sm80(PyTorchMemEffAttention::AttentionBackwardKernel<cutlass::arch::Sm80, cutlass::bfloat16_t, true, false, false, 64, 64, 64, false>::Params)": kc.ATTENTION,
    "void at::native::vectorized_elementwise_kernel<4, at::native::BinaryFunctor<c10::BFloat16, c10::BFloat16, c10::BFloat16, at::native::binary_internal::MulFunctor<float> >, std::array<char*, 3ul> >(int, at::native::BinaryFunctor<c10::BFloat16, c10::BFloat16, c10::BFloat16, at::native::binary_internal::MulFunctor<float> >, std::array<char*, 3ul>)": kc.ELEMENTWISE,
    "triton_poi_fused_add_mul_silu_4": kc.ELEMENTWISE,
    "void at::native::index_elementwise_kernel<128, 4, at::native::gpu_index_kernel<at::native::index_kernel_impl<at::native::OpaqueType<2> >(at::TensorIteratorBase&, c10::ArrayRef<long>, c10::ArrayRef<long>)::{lambda(char*, char const*, long)#1}>(at::TensorIteratorBase&, c10::ArrayRef<long>, c10::ArrayRef<long>, at::native::index_kernel_impl<at::native::OpaqueType<2> >(at::TensorIteratorBase&, c10::ArrayRef<long>, c10::ArrayRef<long>)::{lambda(char*, char const*, long)#1} const&)::{lambda(int)#1}>(long, at::native::gpu_index_kernel<at::native::index_kernel_impl<at::native::OpaqueType<2> >(at::TensorIteratorBase&, c10::ArrayRef<long>, c10::ArrayRef<long>)::{lambda(char*, char const*, long)#1}>(at::TensorIteratorBase&, c10::ArrayRef<long>, c10::ArrayRef<long>, at::native::index_kernel_impl<at::native::OpaqueType<2> >(at::TensorIteratorBase&, c10::ArrayRef<long>, c10::ArrayRef<long>)::{lambda(char*, char const*, long)#1} const&)::{lambda(int)#1})": kc.INDEXING,
    "void at::native::(anonymous namespace)::indexSelectLargeIndex<c10::BFloat16, long, unsigned int, 2, 2, -2, true>(at::cuda::detail::TensorInfo<c10::BFloat16, unsigned int>, at::cuda::detail::TensorInfo<c10::BFloat16 const, unsigned int>, at::cuda::detail::TensorInfo<long const, unsigned int>, int, int, unsigned int, unsigned int, long)": kc.INDEXING,
    "aten::addmm": kc.GEMM,
    "aten::mm": kc.GEMM,
    "aten::_grouped_mm": kc.GEMM,
    "aten::copy_": kc.COPIES,
    "aten::native_dropout": kc.DROPOUT,
    "aten::bernoulli_": kc.DROPOUT,
    "aten::_log_softmax": kc.REDUCTIONS,
    "aten::sum": kc.REDUCTIONS,
    "aten::index_select": kc.INDEXING,
    "aten::_scaled_dot_product_flash_attention_for_cpu": kc.ATTENTION,
    "aten::mul": kc.ELEMENTWISE,
    "aten::silu_backward": kc.ELEMENTWISE,
    "Optimizer.step/aten::addcdiv_": kc.OPTIMIZER,
    "cudaLaunchKernel": kc.OTHER,
}


@pytest.mark.parametrize(("name", "category"), NAMES.items(), ids=[n[:60] for n in NAMES])
def test_kernel_category(name: str, category: str) -> None:
    assert kc.kernel_category(name) == category


def test_tally_and_side_by_side() -> None:
    gemm, cast = next(iter(NAMES)), "Memcpy DtoD (Device -> Device)"
    base = kc.tally([(gemm, 2.0), (gemm, 3.0)])
    variant = kc.tally([(gemm, 2.0), (gemm, 3.5), (gemm, 0.25), (cast, 0.125)])
    assert base[kc.GEMM] == (2, 5.0)
    assert variant[kc.GEMM] == (3, 5.75)
    assert variant[kc.COPIES] == (1, 0.125)
    assert set(variant) == set(kc.CATEGORIES)
    lines = kc.side_by_side(base, variant)
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    assert set(rows) == {"GEMM", "casts/copies", "total"}  # categories with no launch on either side left out
    assert rows["GEMM"] == ["2", "5.00", "3", "5.75", "+1", "+0.75"]
    assert rows["casts/copies"] == ["0", "0.00", "1", "0.12", "+1", "+0.12"]
    assert rows["total"] == ["2", "5.00", "4", "5.88", "+2", "+0.88"]
    assert lines[0].split()[1:3] == ["bound", "n"]
    assert kc.side_by_side(base, variant, "base fwd")[0].split()[1:4] == ["base", "fwd", "n"]  # what it stands beside


def test_series_medians_over_rounds() -> None:
    series = bound.Series("lora step", "grafting")
    for ms, against in [(120.0, 100.0), (110.0, 100.0), (105.0, 80.0)]:  # ratios 1.2, 1.1, 1.3125
        series.add(ms, against, float("nan"), {"aten_ops": 7})
    series.add(118.0, 100.0, 12.0, {"aten_ops": 9})  # 1.18; later rounds' counts do not replace the first's
    row = series.row()
    assert row["rounds_ms"] == [120.0, 110.0, 105.0, 118.0]
    assert row["median_ms"] == row["ms"] == 114.0
    assert row["ratio"] == pytest.approx((1.18 + 1.2) / 2)
    assert row["fastest_ratio"] == pytest.approx(1.1)  # the round lowest against its own bound
    assert row["fastest_ms"] == 110.0
    assert row["spread"] == pytest.approx((1.3125 - 1.1) / row["ratio"])
    assert row["peak_mib"] == 12.0
    assert row["aten_ops"] == 7


def test_rotated_starts_each_round_elsewhere() -> None:
    items = ["a", "b", "c"]
    firsts = [bound.rotated(items, turn)[0] for turn in range(4)]
    assert firsts == ["a", "b", "c", "a"]
    assert sorted(bound.rotated(items, 2)) == items
    assert bound.rotated([], 3) == []


def test_rounds_rotate_the_variants_and_survive_running_out(monkeypatch: pytest.MonkeyPatch) -> None:
    bench = object.__new__(bound.Bench)  # the round loop alone: figures faked, no model built
    bench.args = bound.parse(["--rounds", "3", "--methods", "a,b,c", "--libs", "grafting", "--device", "cpu"])
    bench.series, bench.skipped, bench.header, bench.round, bench.compiled = {}, set(), {}, 0, False
    order = []

    def fake_bound(self: bound.Bench) -> None:
        self.bound = 100.0 + 10 * self.round  # the bound drifts from round to round
        self.record("bound (train)", "base", self.bound, self.bound)

    def fake_variant(self: bound.Bench, method: str, lib: str) -> None:
        if (self.round, method) == (1, "c"):
            raise torch.OutOfMemoryError("CUDA out of memory")
        if (self.round, method) == (2, "b"):
            raise KeyboardInterrupt  # what a time limit's SIGTERM becomes
        order.append((self.round, method))
        self.record(f"{method} step", lib, 1.25 * self.bound, self.bound)

    monkeypatch.setattr(bound.Bench, "measure_bound", fake_bound)
    monkeypatch.setattr(bound.Bench, "measure_variant", fake_variant)
    rows = {row["figure"]: row for row in bench.measure()}
    # each round starts a place further on; c, out of memory in round 2, is left out of round 3
    assert order == [(0, "a"), (0, "b"), (0, "c"), (1, "b"), (1, "a"), (2, "a")]
    assert rows["a step"]["rounds_ms"] == [125.0, 137.5, 150.0]
    assert rows["b step"]["rounds_ms"] == [125.0, 137.5]  # round 3 was interrupted before b
    assert rows["c step"]["rounds_ms"] == [125.0]
    for figure in ("a step", "b step", "c step"):  # each round's figure against that round's bound
        assert rows[figure]["rounds_ratio"] == [1.25] * len(rows[figure]["rounds_ms"])
        assert rows[figure]["spread"] == 0.0
    assert rows["bound (train)"]["rounds_ms"] == [100.0, 110.0, 120.0]
    assert rows["bound (train)"]["fastest_ms"] == 100.0


def test_summary_table() -> None:
    series = bound.Series("dora step", "peft")
    series.add(200.0, 100.0, 1536.0, {})
    series.add(150.0, 100.0, float("nan"), {})
    header, rule, line = bound.summary_table([series.row()])
    assert header.startswith("| figure | lib | median ratio | fastest round")
    assert rule.count("---") == 6
    assert line == "| dora step | peft | 1.75× | 1.50× | 175.00 | 1536 |"


def test_saved_for_backward_counts_each_storage_once() -> None:
    weight = nn.Parameter(torch.randn(16, 32), requires_grad=False)
    x = torch.randn(8, 16, requires_grad=True)

    def step() -> None:
        hidden = x @ weight  # saves the weight (resident) for x's gradient
        both = hidden.relu()  # saves its output: 8 x 32 floats
        (both * both[:, :1]).sum().backward()  # a view of the same output: no second storage

    saved = bound.saved_for_backward(step, [weight, x])
    assert saved["saved_activation_mib"] * 2**20 == 8 * 32 * 4
    assert saved["saved_mib"] * 2**20 == 8 * 32 * 4 + 16 * 32 * 4
    assert saved["saved_storages"] == 2


def test_cpu_profile_sorts_a_step() -> None:
    model = nn.Linear(8, 8)
    opt = torch.optim.AdamW(model.parameters(), foreach=False)

    def step() -> None:
        model(torch.randn(4, 8).to(torch.float64).float()).sum().backward()
        opt.step()
        opt.zero_grad()

    found = bound.profile_step(step, "cpu")
    counts = kc.tally(found.kernels)
    assert counts[kc.GEMM][0] >= 2  # the forward addmm and the weight gradient's mm
    assert counts[kc.OPTIMIZER][0] > 0
    assert counts[kc.COPIES][0] >= 2  # the two casts, each one _to_copy (the copy_ inside it not counted again)
    assert not any(name.removeprefix("aten::") in bound.NO_KERNEL for name, _ in found.kernels)
    assert found.wall_ms >= found.kernel_ms > 0


def test_device_profile_keeps_the_device_events() -> None:
    def event(
        name: str, device: torch.autograd.DeviceType, start: float, end: float, annotation: bool = False
    ) -> SimpleNamespace:
        return SimpleNamespace(
            name=name,
            device_type=device,
            time_range=SimpleNamespace(start=start, end=end),
            device_time=end - start,
            is_user_annotation=annotation,
        )

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    events = [
        event("aten::mm", cpu, 0.0, 9000.0),  # the host's op: not a kernel
        event(next(iter(NAMES)), cuda, 1000.0, 3000.0),
        event("Memcpy DtoD (Device -> Device)", cuda, 4000.0, 4500.0),
        # a record_function range (the optimizer's step) on the device's timeline: it spans kernels, is none
        event("Optimizer.step#AdamW.step", cuda, 900.0, 4600.0, annotation=True),
    ]
    found = bound.device_profile(events, wall_ms=9.0)
    assert found.kernels == [(next(iter(NAMES)), 2.0), ("Memcpy DtoD (Device -> Device)", 0.5)]
    assert found.kernel_ms == 2.5
    assert found.span_ms == 3.5  # first start to last end, the gap between them included


@pytest.mark.slow
def test_rounds_on_the_tiny_preset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "rows.json"
    argv = "--preset tiny --device cpu --rounds 2 --steps 1 --warmup 0 --libs grafting --methods ia3,lora-bf16"
    bound.main([*argv.split(), "--saved", "--json", str(out)])
    rows = {(r["figure"], r["lib"]): r for r in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == {
        ("bound (train)", "base"),
        ("base forward", "base"),
        ("ia3 step", "grafting"),
        ("lora-bf16 step", "grafting"),
        ("lora-bf16 inference", "grafting"),
    }
    for row in rows.values():
        assert len(row["rounds_ms"]) == len(row["rounds_ratio"]) == 2
        assert row["ratio"] == pytest.approx(sum(row["rounds_ratio"]) / 2, rel=1e-3)
        assert math.isclose(row["fastest_ratio"], min(row["rounds_ratio"]), rel_tol=1e-3)
    for variant in ("ia3 step", "lora-bf16 step"):  # each adapter keeps something more for its backward
        assert rows[variant, "grafting"]["saved_activation_mib"] > rows["bound (train)", "base"]["saved_activation_mib"]
    printed = capsys.readouterr().out
    firsts = [line.split("]")[1].split()[:2] for line in printed.splitlines() if "step " in line and "[round" in line]
    assert firsts[0] != firsts[2]  # the second round measured the other variant first
    assert "| lora-bf16 step | grafting |" in printed
    assert "(bound +" in printed  # the saved bytes beside the bound's
