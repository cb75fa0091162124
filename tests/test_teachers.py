import pytest
import torch

from tnkd.teachers import CNN, MLP, atomic_save, file_digest, load_teacher, save_teacher


def test_mlp_is_a_sequential_of_linear_layers():
    mlp = MLP(784, 10, hidden=(1200, 1200))
    linears = [m for m in mlp if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (784, 1200),
        (1200, 1200),
        (1200, 10),
    ]
    assert mlp(torch.rand(3, 1, 28, 28)).shape == (3, 10)


def test_cnn_shapes_and_flat_inputs():
    cnn = CNN((1, 8, 8), 10, channels=(8, 16), hidden=32).eval()
    x = torch.rand(4, 1, 8, 8)
    assert cnn(x).shape == (4, 10)
    assert torch.allclose(cnn(x.flatten(1)), cnn(x))
    with pytest.raises(ValueError, match="too many"):
        CNN((1, 2, 2), 10, channels=(4, 4))


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    cnn = CNN((1, 8, 8), 10, channels=(4,), hidden=16).eval()
    path = save_teacher(cnn, tmp_path / "t.pt", metrics={"val/teacher_acc": 0.9})
    rebuilt = load_teacher(path)  # architecture read from the file
    x = torch.rand(5, 1, 8, 8)
    assert isinstance(rebuilt, CNN) and not rebuilt.training
    assert torch.equal(rebuilt(x), cnn(x))
    assert len(file_digest(path)) == 64


def test_existing_file_is_never_overwritten(tmp_path):
    path = tmp_path / "t.pt"
    path.write_bytes(b"user data")
    with pytest.raises(FileExistsError, match="already exists"):
        save_teacher(MLP(4, 2, hidden=(3,)), path)
    assert path.read_bytes() == b"user data"
    assert [p.name for p in tmp_path.iterdir()] == ["t.pt"]  # no temporary left behind


def test_corrupt_missing_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; train it first"):
        load_teacher(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00not a torch file")
    with pytest.raises(ValueError, match="corrupt or not a torch file"):
        load_teacher(bad)
    foreign = atomic_save([1, 2, 3], tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not a tnkd teacher file"):
        load_teacher(foreign)
    weights_only = atomic_save({"weights": torch.zeros(2)}, tmp_path / "weights.pt")
    with pytest.raises(ValueError, match=r"holds only weights .* give the architecture"):
        load_teacher(weights_only)


def _trained_like(net):
    """A network with weights that differ from any fresh initialisation."""
    torch.manual_seed(123)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
    return net.eval()


def _same(a, b):
    return all(
        torch.equal(x, y)
        for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def test_bring_your_own_teacher_state_dict_lightning_checkpoint_and_pickle(tmp_path):
    net = _trained_like(MLP(16, 4, hidden=(8,)))
    x = torch.rand(3, 16)
    # a plain state_dict: needs the architecture
    torch.save(net.state_dict(), tmp_path / "state.pt")
    loaded = load_teacher(tmp_path / "state.pt", MLP(16, 4, hidden=(8,)))
    assert _same(loaded, net) and not loaded.training
    # a Lightning checkpoint of a module that holds the net as `net.` (TeacherModule)
    ckpt = {"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}, "epoch": 3}
    torch.save(ckpt, tmp_path / "teacher.ckpt")
    assert _same(load_teacher(tmp_path / "teacher.ckpt", MLP(16, 4, hidden=(8,))), net)
    # a pickled module: refused unless trusted (loading runs code from the file)
    torch.save(net, tmp_path / "module.pt")
    with pytest.raises(ValueError, match=r"pickled Python object .* trust_teacher_file"):
        load_teacher(tmp_path / "module.pt")
    trusted = load_teacher(tmp_path / "module.pt", trust_file=True)
    assert torch.equal(trusted(x), net(x))
    # the same weights into a given architecture
    assert _same(
        load_teacher(tmp_path / "module.pt", MLP(16, 4, hidden=(8,)), trust_file=True), net
    )
    # weights of another shape: one clear error
    with pytest.raises(ValueError, match="does not fit the given teacher network"):
        load_teacher(tmp_path / "state.pt", MLP(16, 4, hidden=(5,)))


def test_weights_that_do_not_fit_the_given_network(tmp_path):
    path = save_teacher(MLP(64, 10, hidden=(32,)), tmp_path / "t.pt")
    with pytest.raises(ValueError, match="does not fit the given teacher network"):
        load_teacher(path, MLP(64, 10, hidden=(16,)))
