"""Independent NumPy transcriptions of the original ML-Net forward pass (SPEC §1), for tests.

Written from the definitions, not from mlnet_jax's code: convolution as sums of shifted
matrix products (optionally a true convolution with an unflipped Theano kernel), pooling from
the index formulas, the prior by explicit linear interpolation at x = (i − 4)/10.
"""

from __future__ import annotations

import numpy as np

VGG_WIDTHS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
POOL_AFTER = {1: 2, 3: 2, 6: 2, 9: 1}  # conv index (0-based) → stride of the pool that follows


def conv_same(x: np.ndarray, kernel_hwio: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Cross-correlation with zero 'same' padding; x is (H, W, C), float64."""
    kh, kw = kernel_hwio.shape[:2]
    ph, pw = kh // 2, kw // 2
    padded = np.pad(x, ((ph, ph), (pw, pw), (0, 0)))
    out = np.zeros(x.shape[:2] + (kernel_hwio.shape[3],))
    for dy in range(kh):
        for dx in range(kw):
            out += padded[dy:dy + x.shape[0], dx:dx + x.shape[1]] @ kernel_hwio[dy, dx]
    return out + bias


def true_conv_same(x: np.ndarray, kernel_oihw: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Theano's convolution: out[i, j] = Σ x[i + a, j + b] · K[c_out, c_in, 1 − a, 1 − b]
    over a, b in {−1, 0, 1} for a 3×3 kernel (the kernel is applied flipped)."""
    k = kernel_oihw.shape[2]
    r = k // 2
    padded = np.pad(x, ((r, r), (r, r), (0, 0)))
    out = np.zeros(x.shape[:2] + (kernel_oihw.shape[0],))
    for a in range(-r, r + 1):
        for b in range(-r, r + 1):
            window = padded[r + a:r + a + x.shape[0], r + b:r + b + x.shape[1]]
            out += window @ kernel_oihw[:, :, r - a, r - b].T
    return out + bias


def max_pool(x: np.ndarray, stride: int, alignment: str) -> np.ndarray:
    """2×2 pooling with ceil(n / stride) outputs; x post-ReLU so zero padding is neutral.

    standard: out[i] = max(x[s·i], x[s·i + 1]); keras1: out[i] = max(x[s·i − 1], x[s·i]).
    """
    rows, cols = x.shape[:2]
    out_rows, out_cols = -(-rows // stride), -(-cols // stride)
    padded = np.zeros((rows + 2, cols + 2, x.shape[2]))
    padded[1:rows + 1, 1:cols + 1] = x  # padded[k + 1] == x[k]
    offsets = (0, 1) if alignment == "standard" else (-1, 0)
    out = np.zeros((out_rows, out_cols, x.shape[2]))
    for i in range(out_rows):
        for j in range(out_cols):
            vals = [padded[stride * i + a + 1, stride * j + b + 1] for a in offsets for b in offsets]
            out[i, j] = np.max(vals, axis=0)
    return out


def max_pool_grad(x: np.ndarray, g: np.ndarray, stride: int, alignment: str,
                  ties: str = "all") -> np.ndarray:
    """Theano's MaxPoolGrad (what the original ML-Net trained with) for ML-Net's 2×2 windows,
    x (B, h, w, C): each input equal to its window's maximum gets the window's whole gradient;
    with ``ties="first"`` only the first such input in row-major order (PyTorch, TensorFlow)."""
    start = -1 if alignment == "keras1" else 0
    b, rows, cols, c = x.shape
    grad = np.zeros_like(x)
    for n in range(b):
        for i in range(g.shape[1]):
            for j in range(g.shape[2]):
                cells = [(r, q) for r in (stride * i + start, stride * i + start + 1)
                         for q in (stride * j + start, stride * j + start + 1)
                         if 0 <= r < rows and 0 <= q < cols]
                for ch in range(c):
                    peak = max(x[n, r, q, ch] for r, q in cells)
                    for r, q in cells:
                        if x[n, r, q, ch] == peak:
                            grad[n, r, q, ch] += g[n, i, j, ch]
                            if ties == "first":
                                break
    return grad


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0.0)


def vgg_features(image: np.ndarray, convs: list, alignment: str, true_conv: bool) -> dict:
    """pool3, pool4, conv5_3 for one (H, W, 3) image. ``convs``: [(kernel, bias)], kernels
    HWIO (cross-correlation) or, with ``true_conv``, Theano OIHW."""
    x = image.astype(np.float64)
    out = {}
    for index, (kernel, bias) in enumerate(convs):
        conv = true_conv_same if true_conv else conv_same
        x = relu(conv(x, np.asarray(kernel, np.float64), np.asarray(bias, np.float64)))
        if index in POOL_AFTER:
            x = max_pool(x, POOL_AFTER[index], alignment)
            if index == 6:
                out["pool3"] = x
            if index == 9:
                out["pool4"] = x
    out["conv5_3"] = x
    return out


def upsample_linear(w: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Bilinear upsampling sampling w at x = (i − 4)/10, clamped to [0, n − 1], per axis."""
    def axis_weights(n_out: int, n_src: int) -> list[tuple[int, int, float]]:
        result = []
        for i in range(n_out):
            pos = min(max((i - 4) / 10.0, 0.0), n_src - 1)
            lo = int(np.floor(pos))
            hi = min(lo + 1, n_src - 1)
            result.append((lo, hi, pos - lo))
        return result

    out = np.zeros((rows, cols))
    for i, (y0, y1, fy) in enumerate(axis_weights(rows, w.shape[0])):
        for j, (x0, x1, fx) in enumerate(axis_weights(cols, w.shape[1])):
            top = (1 - fx) * w[y0, x0] + fx * w[y0, x1]
            bottom = (1 - fx) * w[y1, x0] + fx * w[y1, x1]
            out[i, j] = (1 - fy) * top + fy * bottom
    return out


def mlnet_forward(image: np.ndarray, convs: list, head_conv: tuple, readout: tuple,
                  prior_w: np.ndarray | None, alignment: str, true_conv: bool) -> np.ndarray:
    """(h/8, w/8) saliency of the original ML-Net for one preprocessed image."""
    f = vgg_features(image, convs, alignment, true_conv)
    x = np.concatenate([f["pool3"], f["pool4"], f["conv5_3"]], axis=-1)
    conv = true_conv_same if true_conv else conv_same
    x = relu(conv(x, np.asarray(head_conv[0], np.float64), np.asarray(head_conv[1], np.float64)))
    x = relu(conv(x, np.asarray(readout[0], np.float64), np.asarray(readout[1], np.float64)))[..., 0]
    if prior_w is not None:
        x = relu(x * upsample_linear(1.0 + np.asarray(prior_w, np.float64), *x.shape))
    return x


def mlnet_loss(pred: np.ndarray, target: np.ndarray, alpha: float = 1.1) -> float:
    """SPEC §1 loss, element by element: mean of (ŷ/max ŷ − y)² / (α − y)."""
    total, count = 0.0, 0
    for b in range(pred.shape[0]):
        peak = pred[b].max()
        for value, y in zip(pred[b].ravel(), target[b].ravel()):
            total += (value / peak - y) ** 2 / (alpha - y)
            count += 1
    return total / count


def original_postprocess(pred: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """The original's postprocess_predictions with cv2.resize (bilinear, half-pixel) spelt out."""
    def resize(a: np.ndarray, out_rows: int, out_cols: int) -> np.ndarray:
        def sample(n_out, n_in):
            pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
            lo = np.floor(pos).astype(int)
            return lo, np.minimum(lo + 1, n_in - 1), pos - lo
        y0, y1, fy = sample(out_rows, a.shape[0])
        x0, x1, fx = sample(out_cols, a.shape[1])
        out = np.zeros((out_rows, out_cols))
        for i in range(out_rows):
            top = a[y0[i], x0] * (1 - fx) + a[y0[i], x1] * fx
            bottom = a[y1[i], x0] * (1 - fx) + a[y1[i], x1] * fx
            out[i] = top * (1 - fy[i]) + bottom * fy[i]
        return out

    p_rows, p_cols = pred.shape
    if rows / p_rows > cols / p_cols:
        new_cols = (p_cols * rows) // p_rows
        big = resize(pred, rows, new_cols)
        img = big[:, (new_cols - cols) // 2:(new_cols - cols) // 2 + cols]
    else:
        new_rows = (p_rows * cols) // p_cols
        big = resize(pred, new_rows, cols)
        img = big[(new_rows - rows) // 2:(new_rows - rows) // 2 + rows, :]
    return img / np.max(img)
