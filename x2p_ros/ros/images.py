"""sensor_msgs/Image <-> numpy, written for this project (cv_bridge is optional).
Works on any object with the Image fields, so it is tested without ROS."""
from __future__ import annotations

import numpy as np

ENCODINGS = {"mono8": (np.uint8, 1), "mono16": (np.uint16, 1), "32FC1": (np.float32, 1), "bgr8": (np.uint8, 3)}
MAX_PIXELS = 4096 * 4096  # larger images are refused: bounded memory in an OR node


class ImageError(ValueError):
    pass


def image_to_array(msg, encodings=("mono8", "mono16", "32FC1"), max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """(H, W) array of a mono image message; ImageError says what is wrong. Images
    above max_pixels are refused before any copy: memory stays bounded."""
    if msg.encoding not in encodings:
        raise ImageError(f"unsupported encoding {msg.encoding!r}; expected one of {', '.join(encodings)}")
    dtype, channels = ENCODINGS[msg.encoding]
    h, w, step = int(msg.height), int(msg.width), int(msg.step)
    if h <= 0 or w <= 0:
        raise ImageError(f"zero-size image ({w} x {h})")
    if h * w > max_pixels:
        raise ImageError(f"image of {w} x {h} pixels exceeds the limit of {max_pixels} pixels")
    row = w * channels * np.dtype(dtype).itemsize
    if step < row:
        raise ImageError(f"step {step} is shorter than a row of {w} pixels ({row} bytes)")
    data = msg.data
    if len(data) != step * h:
        raise ImageError(f"data has {len(data)} bytes, expected step x height = {step * h}")
    try:
        buf = np.frombuffer(data, dtype=np.uint8)  # bytes, array.array, memoryview: no copy
    except TypeError:
        buf = np.asarray(data, dtype=np.uint8)
    rows = buf.reshape(h, step)[:, :row]
    big_endian = bool(getattr(msg, "is_bigendian", 0))
    arr = rows.copy().view(np.dtype(dtype).newbyteorder(">" if big_endian else "<")).reshape(h, w, channels)
    arr = arr[..., 0].astype(dtype) if channels == 1 else arr.astype(dtype)
    if msg.encoding == "32FC1" and not np.all(np.isfinite(arr)):
        raise ImageError("32FC1 image contains NaN or Inf pixels")
    return arr


def array_to_fields(image: np.ndarray) -> dict:
    """Image message fields (encoding, height, width, step, data, is_bigendian) for an array."""
    image = np.ascontiguousarray(image)
    if image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8:
        encoding = "bgr8"
    elif image.ndim == 2:
        encoding = {np.dtype(np.uint8): "mono8", np.dtype(np.uint16): "mono16",
                    np.dtype(np.float32): "32FC1"}.get(image.dtype)
        if encoding is None:
            raise ImageError(f"no image encoding for {image.dtype}")
    else:
        raise ImageError(f"no image encoding for shape {image.shape}")
    image = image.astype(image.dtype.newbyteorder("<"), copy=False)
    return {"encoding": encoding, "height": image.shape[0], "width": image.shape[1],
            "step": image.strides[0], "data": image.tobytes(), "is_bigendian": 0}
