"""The personalization recipes' masked loss: DreamBooth's instance rows weighted by their
own image's mask coverage (class rows keep the plain loss), and the masks read from a
folder beside the instance images (``config.mask_dir``)."""
import jax
import numpy as np
import pytest
from PIL import Image

from jaxdiff.data.image_folder import load_image_folder, load_mask_folder
from jaxdiff.data.images import InputError
from jaxdiff.training import dreambooth as db
from jaxdiff.training import recipes
from jaxdiff.training.latents import mask_loss_weights


def test_dreambooth_weights_only_the_instance_rows_each_by_its_own_mask(micro):
    _, pipe, params = micro
    rng = np.random.default_rng(0)
    inst = rng.normal(size=(5, 8, 8, 4)).astype(np.float32)
    weights = mask_loss_weights(rng.random((5, 64, 64)) < 0.3, 4.0, np.zeros((5, 64, 64, 3)),
                                factor=8)
    ctx = np.asarray(pipe.encode_text(params, pipe.tokenize(["sks o", "o"])))
    texts = {"instance": ctx[:1], "class": ctx[1:]}
    latents = {"instance": inst, "class": rng.normal(size=(3, 8, 8, 4)).astype(np.float32)}
    batch_fn = db.make_batch_fn(latents, texts, batch_size=4, seed=2, weights=weights)
    for s in range(3):
        batch = batch_fn(s)
        for row, w in zip(batch["instance_latents"], batch["instance_weights"]):
            (i,) = [k for k in range(5) if np.array_equal(inst[k], row)]
            np.testing.assert_array_equal(w, weights[i])
    tr = db.make_trainable(params)
    loss = jax.jit(db.make_dreambooth_loss(pipe, tr.merge, train_text_encoder=False,
                                           prior_preservation=True))
    key, batch = jax.random.key(0), batch_fn(0)
    plain = {lam: dict(batch, prior_weight=np.full(4, lam, np.float32)) for lam in (0.0, 1.0)}
    masked = {lam: dict(b) for lam, b in plain.items()}
    ones = {lam: dict(b, instance_weights=np.ones_like(b["instance_weights"]))
            for lam, b in plain.items()}
    for b in plain.values():
        del b["instance_weights"]
    value = lambda b: float(loss(tr.params, b, key))
    np.testing.assert_allclose(value(ones[1.0]), value(plain[1.0]), rtol=1e-6)
    assert abs(value(masked[0.0]) - value(plain[0.0])) > 1e-6  # the instance term moves
    # ... and the class term does not: L(lambda = 1) - L(lambda = 0) is the same.
    np.testing.assert_allclose(value(masked[1.0]) - value(masked[0.0]),
                               value(plain[1.0]) - value(plain[0.0]), rtol=1e-4)


def test_mask_folder_pairs_masks_by_name_and_names_what_is_wrong(tmp_path):
    images, masks = tmp_path / "subject", tmp_path / "masks"
    images.mkdir(), masks.mkdir()
    for name, x0 in (("a", 2), ("b", 10)):
        Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(images / f"{name}.png")
        m = np.zeros((16, 16), np.uint8)
        m[4:12, x0:x0 + 4] = 255
        Image.fromarray(m).save(masks / f"{name}.{'png' if name == 'a' else 'bmp'}")
    _, paths = load_image_folder(str(images), (8, 8))
    got = load_mask_folder(str(masks), paths, (8, 8))
    want = np.zeros((2, 8, 8), bool)
    want[0, 2:6, 1:3], want[1, 2:6, 5:7] = True, True
    np.testing.assert_array_equal(got, want)
    (masks / "b.bmp").unlink()
    with pytest.raises(InputError, match=r"masks: no mask for b\.png \(looked for b\.png"):
        load_mask_folder(str(masks), paths, (8, 8))
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(masks / "b.png")
    with pytest.raises(InputError, match=r"b\.png: the mask is empty"):
        load_mask_folder(str(masks), paths, (8, 8))
    with pytest.raises(InputError, match="mask folder not found"):
        load_mask_folder(str(tmp_path / "nowhere"), paths, (8, 8))

    class Config(dict):
        __getattr__ = dict.__getitem__

    class Pipe:
        image_size = 8

    config = Config(instance_dir=str(images), fit="crop", mask_dir="", mask_weight=2.0)
    with pytest.raises(ValueError, match=r"^config\.mask_weight=2\.0 needs masks; pass "
                       r"--config\.mask_dir=FOLDER"):
        recipes.instance_images(config, Pipe())
    imgs, none = recipes.instance_images(Config(config, mask_weight=0.0), Pipe())
    assert imgs.shape == (2, 8, 8, 3) and none is None
