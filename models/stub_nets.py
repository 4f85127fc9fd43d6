"""The TensorFlow networks behind the stand-in models of `models.stubs` (fixed random weights).

Both are `tf.Module`s with a `serve` tf.function that has Path Foundation's serving signature.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from models.signature import EMBEDDING_DIM, INPUT_NAME, OUTPUT_KEY, PATCH_SIZE

_INPUT_SPEC = tf.TensorSpec([None, PATCH_SIZE, PATCH_SIZE, 3], tf.float32, name=INPUT_NAME)


def _normal(rng: np.random.Generator, shape: tuple[int, ...], scale: float) -> tf.Variable:
    return tf.Variable(rng.standard_normal(shape, dtype=np.float32) * np.float32(scale))


class TinyConvNet(tf.Module):
    """Four strided 'same' convs (224 -> 56 -> 28 -> 14 -> 7), mean+std pooling, linear to 384."""

    # (kernel, stride, channels out)
    LAYERS = ((4, 4, 32), (3, 2, 64), (3, 2, 128), (3, 2, 256))
    SEED = 20240611

    def __init__(self) -> None:
        super().__init__(name="stub_tiny")
        rng = np.random.default_rng(self.SEED)
        self.kernels: list[tf.Variable] = []
        self.biases: list[tf.Variable] = []
        c_in = 3
        for k, _, c_out in self.LAYERS:
            self.kernels.append(_normal(rng, (k, k, c_in, c_out), math.sqrt(2.0 / (k * k * c_in))))
            self.biases.append(tf.Variable(np.zeros(c_out, np.float32)))
            c_in = c_out
        self.pool_shift = tf.Variable(np.zeros(2 * c_in, np.float32))
        self.pool_scale = tf.Variable(np.ones(2 * c_in, np.float32))
        self.head = _normal(rng, (2 * c_in, EMBEDDING_DIM), 1.0 / math.sqrt(2 * c_in))
        self._calibrate(_calibration_images(rng))

    def _conv(self, x: tf.Tensor, i: int) -> tf.Tensor:
        """Layer i's pre-activation."""
        stride = self.LAYERS[i][1]
        return tf.nn.conv2d(x, self.kernels[i], stride, "SAME") + self.biases[i]

    def _pooled(self, images: tf.Tensor) -> tf.Tensor:
        x = (images - 0.5) * 2.0
        for i in range(len(self.LAYERS)):
            x = tf.nn.relu(self._conv(x, i))
        mean, var = tf.nn.moments(x, axes=[1, 2])
        return tf.concat([mean, tf.sqrt(var + 1e-6)], axis=-1)

    def _calibrate(self, images: np.ndarray) -> None:
        """Folds a frozen batch norm into each layer: zero mean, unit variance on `images`."""
        x = (tf.constant(images) - 0.5) * 2.0
        for i in range(len(self.LAYERS)):
            mean, var = _rounded_moments(self._conv(x, i), axes=[0, 1, 2])
            scale = 1.0 / np.sqrt(var + 1e-5)
            self.kernels[i].assign(self.kernels[i] * scale)
            self.biases[i].assign((self.biases[i] - mean) * scale)
            x = tf.nn.relu(self._conv(x, i))
        mean, var = _rounded_moments(self._pooled(tf.constant(images)), axes=[0])
        self.pool_shift.assign(mean)
        self.pool_scale.assign(1.0 / np.sqrt(var + 1e-5))

    @tf.function(input_signature=[_INPUT_SPEC])
    def serve(self, inputs: tf.Tensor) -> dict[str, tf.Tensor]:
        features = (self._pooled(inputs) - self.pool_shift) * self.pool_scale
        return {OUTPUT_KEY: tf.matmul(features, self.head)}


def _rounded_moments(x: tf.Tensor, axes: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Moments rounded to float16 precision, so float32 noise cannot make two builds differ."""
    mean, var = tf.nn.moments(x, axes=axes)
    return (
        mean.numpy().astype(np.float16).astype(np.float32),
        var.numpy().astype(np.float16).astype(np.float32),
    )


def _calibration_images(rng: np.random.Generator, n: int = 48) -> np.ndarray:
    """Synthetic [n, 224, 224, 3] images in [0, 1]: flat colours, gradients, blobs and noise."""
    size = PATCH_SIZE
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    images = np.empty((n, size, size, 3), np.float32)
    for i in range(n):
        base = rng.uniform(0.2, 1.0, 3).astype(np.float32)
        img = np.broadcast_to(base, (size, size, 3)).copy()
        kind = i % 4
        if kind == 1:  # linear gradient towards a second colour
            other = rng.uniform(0.0, 1.0, 3).astype(np.float32)
            t = (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1))[..., None]
            img = img + (other - base) * np.clip(t, 0, 1)
        elif kind == 2:  # round blobs ("nuclei") of a darker colour
            dark = rng.uniform(0.1, 0.6, 3).astype(np.float32)
            for _ in range(int(rng.integers(5, 60))):
                cy, cx = rng.uniform(0, 1, 2)
                r = rng.uniform(0.01, 0.06)
                img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = dark
        elif kind == 3:  # coarse or fine noise texture
            cell = int(rng.choice([1, 2, 4, 8, 16]))
            noise = rng.normal(0, rng.uniform(0.05, 0.3), (size // cell, size // cell, 3))
            img = img + np.kron(noise, np.ones((cell, cell, 1))).astype(np.float32)
        images[i] = np.clip(img, 0.0, 1.0)
    return images


class VitS16(tf.Module):
    """ViT-S/16: 16 px patches, width 384, 12 pre-norm blocks of 6 heads, MLP 1536, class token."""

    PATCH = 16
    DIM = 384
    DEPTH = 12
    HEADS = 6
    MLP = 1536
    SEED = 20240612

    def __init__(self) -> None:
        super().__init__(name="stub_vit_s16")
        rng = np.random.default_rng(self.SEED)
        d, p = self.DIM, self.PATCH
        tokens = (PATCH_SIZE // p) ** 2 + 1
        # Residual-branch outputs are scaled down with depth so the stream stays finite.
        branch = 1.0 / math.sqrt(2 * self.DEPTH)
        self.patch_w = _normal(rng, (p * p * 3, d), 1.0 / math.sqrt(p * p * 3))
        self.patch_b = tf.Variable(np.zeros(d, np.float32))
        self.cls = _normal(rng, (1, 1, d), 0.02)
        self.pos = _normal(rng, (1, tokens, d), 0.02)
        self.blocks: list[dict[str, tf.Variable]] = []
        for _ in range(self.DEPTH):
            self.blocks.append({
                "ln1_g": tf.Variable(np.ones(d, np.float32)),
                "ln1_b": tf.Variable(np.zeros(d, np.float32)),
                "qkv_w": _normal(rng, (d, 3 * d), 1.0 / math.sqrt(d)),
                "qkv_b": tf.Variable(np.zeros(3 * d, np.float32)),
                "proj_w": _normal(rng, (d, d), branch / math.sqrt(d)),
                "proj_b": tf.Variable(np.zeros(d, np.float32)),
                "ln2_g": tf.Variable(np.ones(d, np.float32)),
                "ln2_b": tf.Variable(np.zeros(d, np.float32)),
                "fc1_w": _normal(rng, (d, self.MLP), 1.0 / math.sqrt(d)),
                "fc1_b": tf.Variable(np.zeros(self.MLP, np.float32)),
                "fc2_w": _normal(rng, (self.MLP, d), branch / math.sqrt(self.MLP)),
                "fc2_b": tf.Variable(np.zeros(d, np.float32)),
            })  # fmt: skip
        self.ln_g = tf.Variable(np.ones(d, np.float32))
        self.ln_b = tf.Variable(np.zeros(d, np.float32))

    @staticmethod
    def _layer_norm(x: tf.Tensor, gamma: tf.Variable, beta: tf.Variable) -> tf.Tensor:
        mean, var = tf.nn.moments(x, axes=[-1], keepdims=True)
        return (x - mean) * tf.math.rsqrt(var + 1e-6) * gamma + beta

    def _attention(self, x: tf.Tensor, blk: dict[str, tf.Variable]) -> tf.Tensor:
        batch, n = tf.shape(x)[0], tf.shape(x)[1]
        head_dim = self.DIM // self.HEADS
        qkv = tf.matmul(x, blk["qkv_w"]) + blk["qkv_b"]
        qkv = tf.transpose(tf.reshape(qkv, [batch, n, 3, self.HEADS, head_dim]), [2, 0, 3, 1, 4])
        q, k, v = qkv[0], qkv[1], qkv[2]  # each [batch, heads, tokens, head_dim]
        weights = tf.nn.softmax(tf.matmul(q, k, transpose_b=True) / math.sqrt(head_dim))
        out = tf.reshape(tf.transpose(tf.matmul(weights, v), [0, 2, 1, 3]), [batch, n, self.DIM])
        return tf.matmul(out, blk["proj_w"]) + blk["proj_b"]

    @tf.function(input_signature=[_INPUT_SPEC])
    def serve(self, inputs: tf.Tensor) -> dict[str, tf.Tensor]:
        batch, p, grid = tf.shape(inputs)[0], self.PATCH, PATCH_SIZE // self.PATCH
        x = (inputs - 0.5) * 2.0
        x = tf.reshape(x, [batch, grid, p, grid, p, 3])
        x = tf.reshape(tf.transpose(x, [0, 1, 3, 2, 4, 5]), [batch, grid * grid, p * p * 3])
        x = tf.matmul(x, self.patch_w) + self.patch_b
        x = tf.concat([tf.tile(self.cls, [batch, 1, 1]), x], axis=1) + self.pos
        for blk in self.blocks:
            x = x + self._attention(self._layer_norm(x, blk["ln1_g"], blk["ln1_b"]), blk)
            h = tf.matmul(self._layer_norm(x, blk["ln2_g"], blk["ln2_b"]), blk["fc1_w"])
            h = tf.nn.gelu(h + blk["fc1_b"])
            x = x + tf.matmul(h, blk["fc2_w"]) + blk["fc2_b"]
        return {OUTPUT_KEY: self._layer_norm(x[:, 0], self.ln_g, self.ln_b)}
