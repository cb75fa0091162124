"""The native chain scan (method="native") against the Python scan and dense references."""

import warnings

import pytest
import torch
from test_mps import dense_reference

from tnkd.students import MPSClassifier
from tnkd.tn import native
from tnkd.tn.chain import contract_chain
from tnkd.tn.planner import chain_kernel


@pytest.fixture(scope="module")
def ext():
    """The compiled kernels, built once per session (about 30 s the first time on a machine)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        kernels = native.kernels()
    if kernels is None:
        pytest.skip("the native chain scan cannot be compiled here (no C++ compiler or ninja)")
    return kernels


def _both(mps: MPSClassifier, x: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    out = {}
    for method in ("scan", "native"):
        mps.method = method
        out[method] = mps.log_forward(x)
    return out


@pytest.mark.parametrize("feature_map", ["linear", "trig"])
@pytest.mark.parametrize(("num_sites", "position"), [(7, 0), (7, 3), (7, 7), (13, 4), (12, 6)])
def test_mps_equals_dense_reference_and_scan(ext, feature_map, num_sites, position):
    # (13, 4): halves of 4 and 9 sites, padded to whole blocks, the shorter one reading an
    # identity block for its last steps; (7, 0) and (7, 7): one half empty
    torch.manual_seed(0)
    mps = MPSClassifier(
        num_sites,
        3,
        bond_dim=4,
        feature_map=feature_map,
        label_position=position,
        output="raw",
        init_std=0.8,
        method="native",
    ).double()
    x = torch.rand(5, num_sites, dtype=torch.float64)
    assert torch.allclose(mps.raw_forward(x), dense_reference(mps, x), rtol=1e-10, atol=1e-12)
    runs = _both(mps, x)
    for got, want in zip(runs["native"], runs["scan"], strict=True):
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-14)


def test_uniform_mps_gradient_equals_dense_reference(ext):
    torch.manual_seed(1)
    mps = MPSClassifier(
        9, 2, bond_dim=3, uniform=True, output="raw", init_std=0.5, method="native"
    ).double()
    x = torch.rand(4, 9, dtype=torch.float64)
    (grad,) = torch.autograd.grad(mps.raw_forward(x).sum(), mps.cores)
    (ref,) = torch.autograd.grad(dense_reference(mps, x).sum(), mps.cores)
    assert torch.allclose(grad, ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("position", [0, 2, 5])
def test_mps_gradients_pass_gradcheck(ext, position):
    torch.manual_seed(2)
    bond, sites = 3, 5
    cores = torch.eye(bond).view(1, bond, 1, bond) + 0.4 * torch.randn(sites, bond, 2, bond)
    params = [
        torch.randn(bond),
        cores,
        torch.randn(bond),
        torch.randn(bond, 2, bond),
    ]
    params = [p.double().requires_grad_() for p in params]
    features = torch.rand(4, sites, 2, dtype=torch.float64)  # constants: the one-node path

    def f(left, cores, right, output_core):
        values, log_scale = contract_chain(
            left, cores, right, features, output_core, position, "native"
        )
        return values * torch.exp(log_scale)[:, None]

    assert torch.autograd.gradcheck(f, params)


@pytest.mark.parametrize("bond", [3, 40])  # sites merged in pairs, or one per step
@pytest.mark.parametrize("members", [1, 3])
def test_learnable_features_and_members_equal_the_scan_with_gradients(ext, bond, members):
    # features with gradients (a learnable map) and M chains at once: the one native node
    # against the Python scan, values and every gradient
    torch.manual_seed(3)
    left = torch.randn(members, bond, dtype=torch.float64)
    right = torch.randn(members, bond, dtype=torch.float64)
    cores = torch.eye(bond).view(1, bond, 1, bond) + 0.3 * torch.randn(members, 11, bond, 2, bond)
    out = torch.randn(members, bond, 2, bond, dtype=torch.float64)
    feats = torch.rand(4, 11, 2, dtype=torch.float64)
    args = [t.double().requires_grad_() for t in (left, cores, right, feats, out)]
    runs = {}
    for method in ("scan", "native"):
        values, log_scale = contract_chain(*args, 4, method)
        exact = values * torch.exp(log_scale)[..., None]
        runs[method] = (values, log_scale, *torch.autograd.grad(exact.sum(), args))
    for got, want in zip(runs["native"], runs["scan"], strict=True):
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("position", [0, 3, 6])
def test_learnable_features_pass_gradcheck(ext, position):
    torch.manual_seed(4)
    cores = (torch.eye(3).view(1, 3, 1, 3) + 0.5 * torch.randn(6, 3, 2, 3)).double()
    args = [torch.randn(3), cores, torch.randn(3), torch.rand(3, 6, 2), torch.randn(3, 2, 3)]
    args = [t.double().requires_grad_() for t in args]

    def f(left, cores, right, feats, out):
        values, log_scale = contract_chain(left, cores, right, feats, out, position, "native")
        return values * torch.exp(log_scale)[..., None]

    assert torch.autograd.gradcheck(f, args)


@pytest.mark.parametrize("feature_map", ["linear", "trig"])
def test_784_sites_stay_finite_and_equal_the_scan(ext, feature_map):
    # float32, the default: [cos, sin] underflows to zero without the tracked log-scale
    torch.manual_seed(5)
    mps = MPSClassifier(784, 10, bond_dim=10, feature_map=feature_map, output="raw")
    x = torch.rand(8, 784)
    runs = _both(mps, x)
    (values, log_scale), (ref_values, ref_log_scale) = runs["native"], runs["scan"]
    assert bool(torch.isfinite(values).all()) and bool(torch.isfinite(log_scale).all())
    assert bool((values.abs().amax(dim=1) > 0.5).all())
    assert torch.allclose(log_scale, ref_log_scale, rtol=1e-5)
    assert torch.allclose(values, ref_values, atol=1e-4)
    mps.method = "native"
    loss = mps.log_forward(x)[0].square().sum()
    loss.backward()
    assert bool(torch.isfinite(mps.cores.grad).all())


@pytest.mark.parametrize("factor", [1e6, 1e-6, 1e20])
def test_values_out_of_float_range_fall_back_like_the_scan(ext, factor):
    # 1e6 and 1e-6: the values leave float32's range between two renormalisations (every 16
    # sites), so both scans redo the pass renormalising every step; 1e20: a merged pair of
    # sites alone overflows, so both redo it one site per step
    torch.manual_seed(6)
    mps = MPSClassifier(40, 3, bond_dim=4, output="raw", init_std=0.3)
    with torch.no_grad():
        mps.cores.mul_(factor)
    mps.cores.requires_grad_()
    x = torch.rand(3, 40)
    runs = {}
    for method in ("scan", "native"):
        mps.method = method
        values, log_scale = mps.log_forward(x)
        (grad,) = torch.autograd.grad(values.sum(), mps.cores)
        runs[method] = (values, log_scale, grad)
    for got, want in zip(runs["native"], runs["scan"], strict=True):
        assert bool(torch.isfinite(got).all())
        scale = float(want.detach().abs().max())
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5 * scale)


def test_auto_picks_native_on_cpu_only(ext):
    assert chain_kernel("auto", 10, torch.device("cpu"))[0] == "native"
    assert chain_kernel("auto", 200)[0] == "native"
    assert chain_kernel("auto", 10, torch.device("cuda"))[0] == "log_depth"


def test_no_compiler_means_the_python_scan_and_one_warning(monkeypatch):
    import torch.utils.cpp_extension

    def fail(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(native, "_STATE", {})  # as if nothing had been built in this process
    monkeypatch.setattr(torch.utils.cpp_extension, "load", fail)
    with pytest.warns(RuntimeWarning, match="could not be compiled.*Ninja is required"):
        assert chain_kernel("auto", 10, torch.device("cpu"))[0] == "scan"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        assert native.kernels() is None
        torch.manual_seed(7)
        mps = MPSClassifier(7, 3, bond_dim=4, output="raw", method="native").double()
        x = torch.rand(2, 7, dtype=torch.float64)
        assert torch.allclose(mps.raw_forward(x), dense_reference(mps, x), rtol=1e-10)


def test_torch_compile_traces_the_python_scan(ext):
    # torch.compile cannot trace into the native functions: under tracing auto picks the scan
    torch.manual_seed(8)
    mps = MPSClassifier(9, 3, bond_dim=4, init_std=0.5)
    x = torch.rand(4, 9)
    compiled = torch.compile(mps, backend="eager")
    with warnings.catch_warnings():
        # what a graph break at a native call would say
        warnings.filterwarnings("error", message="Dynamo does not know how to trace")
        out = compiled(x)
    assert torch.allclose(out, mps(x), atol=1e-6)


def test_a_backward_rerun_pairs_its_own_vectors_with_its_gradients(ext, monkeypatch):
    # a reverse scan whose start left float range is redone after a forward pass renormalising
    # every step; the feature gradients must come from that pass's vectors and gradients (forced
    # here: the first reverse scan reports its start out of range)
    class FirstStartOutOfRange:
        def __init__(self):
            self.calls = 0

        def __getattr__(self, name):
            return getattr(ext, name)

        def scan_backward(self, *args):
            self.calls += 1
            gs, g_blocks, grad_finite, start_finite = ext.scan_backward(*args)
            return gs, g_blocks, grad_finite, start_finite and self.calls > 1

    torch.manual_seed(5)
    cores = (torch.eye(3).view(1, 3, 1, 3) + 0.5 * torch.randn(40, 3, 2, 3)).double()
    args = [torch.randn(3), cores, torch.randn(3), 3 * torch.rand(4, 40, 2), torch.randn(3, 2, 3)]
    args = [t.double().requires_grad_() for t in args]
    proxy = FirstStartOutOfRange()
    runs = {}
    for method in ("scan", "native"):
        with monkeypatch.context() as patch:
            patch.setattr(native, "kernels", lambda *a, **k: proxy)
            values, log_scale = contract_chain(*args, 17, method)
            exact = values * torch.exp(log_scale)[..., None]
            runs[method] = torch.autograd.grad(exact.sum(), args)
    assert proxy.calls == 2  # the rerun happened
    for got, want in zip(runs["native"], runs["scan"], strict=True):
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-13)
