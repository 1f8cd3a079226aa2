"""Built-in metacalibration over GalSim adaptive moments: no NGMix needed.

For each galaxy stamp: interpolate it (``galsim.InterpolatedImage``, Lanczos-15), divide
out the PSF image (which already contains the pixel), shear by ``±step`` along g1 and g2,
reconvolve with a slightly larger target PSF and sample on the original pixel grid. The
adaptive moments (``galsim.hsm.FindAdaptiveMom``) of each version give the distortion
``e = (e1, e2)`` and the per-object response ``R_ij = (e_i(+step_j) - e_i(-step_j)) / 2 step``.
A set of objects is calibrated by the inverse of its mean response: ``g = <R>^-1 e_noshear``.

The target (reconvolution) PSF follows NGMix's choices: ``"dilate"`` (the pixel-deconvolved
PSF dilated by 1 + 2|step|, reconvolved with the pixel), ``"fitgauss"`` (a round Gaussian
from the adaptive moments of the PSF, dilated) and ``"gauss"`` (the round Gaussian that is
everywhere in k smaller than the PSF, dilated). ``"dilate"`` is only round for a round PSF.

Noise correction (``fix_noise``): shearing the image shears (correlates) its noise. As in
NGMix, an independent noise image of the same level is rotated by 90 degrees, put through
the same operations, rotated back and added; the sheared noise then has no preferred
direction, at the price of twice the noise variance.

Speed: the target PSF's k-image is computed once per PSF; per galaxy only the sheared,
PSF-deconvolved k-image is drawn by GalSim, multiplied by the target and inverse-FFT'd with
numpy (the same result as ``galsim.Convolve(...).drawImage(method="no_pixel")``).
"""

from __future__ import annotations

import galsim
import numpy as np
from scipy import fft as scipy_fft

METACAL_DEFAULTS: dict[str, object] = {
    "step": 0.01,
    "psf": "dilate",
    "fix_noise": None,
    "interpolant": "lanczos15",
    "seed": 0,
}
TARGET_PSFS = ("dilate", "fitgauss", "gauss")
FIX_NOISE_ABOVE = 1e-4
"""``fix_noise=None`` turns the noise correction on when noise_sigma exceeds this."""

SHEARS = {
    "noshear": (0.0, 0.0),
    "1p": (1.0, 0.0),
    "1m": (-1.0, 0.0),
    "2p": (0.0, 1.0),
    "2m": (0.0, -1.0),
}


def resolve_fix_noise(fix_noise: bool | None, noise_sigma: float) -> bool:
    """The effective noise-correction switch: ``None`` means on above very low noise."""
    if fix_noise is None:
        return noise_sigma > FIX_NOISE_ABOVE
    return bool(fix_noise)


def dilation(step: float) -> float:
    """NGMix's PSF dilation for a shear step: 1 + 2|step|."""
    return 1.0 + 2.0 * abs(step)


def _gauss_target(psf_nopix: galsim.GSObject, flux: float) -> galsim.GSObject:
    """The round Gaussian whose k-profile is below the PSF's (NGMix/GalSim ``"gauss"`` target)."""
    dk = psf_nopix.stepk / 4.0
    kimage = psf_nopix.drawKImage(scale=dk).real.array
    size = kimage.shape[0]
    kx, ky = np.meshgrid(np.arange(-size / 2, size / 2), np.arange(-size / 2, size / 2))
    ksq = (kx**2 + ky**2) * dk**2
    ksq_max = np.min(ksq[kimage < 1e-2 * psf_nopix.flux])
    sigma_sq = -2.0 * np.log(3e-3) / ksq_max
    return galsim.Gaussian(sigma=np.sqrt(sigma_sq), flux=flux)


def _fitgauss_target(psf_image: np.ndarray, pixel_scale: float, flux: float) -> galsim.GSObject:
    """A round Gaussian matched to the adaptive moments of the PSF image (grown if elliptical)."""
    moments = galsim.hsm.FindAdaptiveMom(galsim.Image(psf_image, scale=pixel_scale))
    sigma = moments.moments_sigma * pixel_scale
    e = np.hypot(moments.observed_shape.e1, moments.observed_shape.e2)
    T = 2 * sigma**2 / np.sqrt(1 - e**2)
    ellip_dilation = min(1.0 + 2.0 * (np.sqrt(1.0 + e) - 1.0), 1.1)
    return galsim.Gaussian(sigma=np.sqrt(T * ellip_dilation / 2), flux=flux)


class MetacalKernel:
    """Everything metacal needs from one PSF image and stamp size, computed once."""

    def __init__(
        self,
        psf_image: np.ndarray,
        pixel_scale: float,
        stamp_size: int,
        step: float = 0.01,
        psf: str = "dilate",
        interpolant: str = "lanczos15",
    ):
        if psf not in TARGET_PSFS:
            raise ValueError(f"metacal psf must be one of {', '.join(TARGET_PSFS)}, got {psf!r}")
        if not 0 < step < 0.1:
            raise ValueError(f"metacal step must be in (0, 0.1), got {step}")
        self.pixel_scale = float(pixel_scale)
        self.stamp_size = int(stamp_size)
        self.step = float(step)
        self.interpolant = interpolant
        psf_array = np.asarray(psf_image, dtype=np.float64)
        psf_ii = galsim.InterpolatedImage(
            galsim.Image(psf_array, scale=self.pixel_scale), x_interpolant=interpolant
        )
        pixel = galsim.Pixel(self.pixel_scale)
        psf_nopix = galsim.Convolve(psf_ii, galsim.Deconvolve(pixel))
        grow = dilation(self.step)
        if psf == "dilate":
            target = galsim.Convolve(psf_nopix.dilate(grow), pixel)
        elif psf == "gauss":
            target = galsim.Convolve(_gauss_target(psf_nopix, psf_ii.flux).dilate(grow), pixel)
        else:
            target = _fitgauss_target(psf_array, self.pixel_scale, psf_ii.flux).dilate(grow)
        self.target = target
        self.fft_size = scipy_fft.next_fast_len(2 * self.stamp_size, real=True)
        if self.fft_size % 2:
            self.fft_size += 1
        size = self.fft_size
        self.dk = 2 * np.pi / (size * self.pixel_scale)
        self.half_bounds = galsim.BoundsI(0, size // 2, -size // 2, size // 2 - 1)
        reconvolve = target.drawKImage(bounds=self.half_bounds, scale=self.dk, recenter=False).array
        ky = np.arange(-size // 2, size // 2)[:, None] * self.dk
        kx = np.arange(0, size // 2 + 1)[None, :] * self.dk
        # GalSim's FFT drawing uses the k-square inside the profile's maxk; do the same.
        reconvolve = np.where(
            (np.abs(kx) > target.maxk) | (np.abs(ky) > target.maxk), 0, reconvolve
        )
        # An even stamp's centre lies between pixels: shift by half a pixel in k.
        centre = (self.stamp_size - 1) / 2
        shift = centre - np.floor(centre)
        if shift:
            reconvolve = reconvolve * np.exp(-1j * (kx + ky) * shift * self.pixel_scale)
        # The PSF deconvolution at the sheared k is the same for every galaxy: fold it, per
        # shear, into the reconvolution, so that per galaxy only its own k-image is drawn.
        psf_inverse = galsim.Deconvolve(psf_ii)
        self.kernels = {}
        for key, (sign1, sign2) in SHEARS.items():
            g1, g2 = sign1 * self.step, sign2 * self.step
            inverse = psf_inverse if key == "noshear" else psf_inverse.shear(g1=g1, g2=g2)
            kimage = inverse.drawKImage(bounds=self.half_bounds, scale=self.dk, recenter=False)
            self.kernels[key] = np.fft.ifftshift(kimage.array * reconvolve, axes=0)
        self.crop = (np.arange(self.stamp_size) - int(np.floor(centre))) % size
        self._kimage = galsim.ImageCD(self.half_bounds, scale=self.dk)

    def interpolated(self, image: np.ndarray) -> galsim.InterpolatedImage:
        """The stamp as a GalSim interpolated profile (still convolved with the PSF)."""
        return galsim.InterpolatedImage(
            galsim.Image(np.asarray(image, dtype=np.float64), scale=self.pixel_scale),
            x_interpolant=self.interpolant,
            calculate_maxk=False,
        )

    def render(self, interpolated: galsim.GSObject, key: str) -> np.ndarray:
        """Metacal image ``key`` ("noshear", "1p", ...): deconvolved, sheared, reconvolved."""
        sign1, sign2 = SHEARS[key]
        profile = interpolated
        if sign1 or sign2:
            profile = interpolated.shear(g1=sign1 * self.step, g2=sign2 * self.step)
        profile.drawKImage(image=self._kimage, recenter=False)
        kimage = np.fft.ifftshift(self._kimage.array, axes=0) * self.kernels[key]
        full = np.fft.irfft2(kimage, s=(self.fft_size, self.fft_size))
        return full[np.ix_(self.crop, self.crop)]

    def images(self, image: np.ndarray, noise: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The five metacal images (noshear, 1p, 1m, 2p, 2m), noise-corrected if ``noise`` given."""
        galaxy = self.interpolated(image)
        rotated_noise = None if noise is None else self.interpolated(np.rot90(noise))
        out = {}
        for key in SHEARS:
            rendered = self.render(galaxy, key)
            if rotated_noise is not None:
                rendered = rendered + np.rot90(self.render(rotated_noise, key), k=3)
            out[key] = rendered
        return out


def adaptive_distortion(
    image: np.ndarray, pixel_scale: float, guess_sig: float = 5.0
) -> tuple[float, float, float]:
    """(e1, e2, sigma in pixels) of the adaptive moments of ``image``; NaNs when HSM fails."""
    result = galsim.hsm.FindAdaptiveMom(
        galsim.Image(np.ascontiguousarray(image), scale=pixel_scale),
        guess_sig=guess_sig,
        strict=False,
    )
    if result.moments_status != 0 or not np.isfinite(result.moments_sigma):
        return np.nan, np.nan, np.nan
    return result.observed_shape.e1, result.observed_shape.e2, result.moments_sigma


def measure_one(
    kernel: MetacalKernel, image: np.ndarray, noise: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """The noshear distortion (2,) and response (2, 2) of one stamp; NaNs if any fit fails."""
    versions = kernel.images(image, noise)
    e1, e2, sigma = adaptive_distortion(versions["noshear"], kernel.pixel_scale)
    shapes = {"noshear": (e1, e2)}
    guess = sigma if np.isfinite(sigma) else 5.0
    for key in ("1p", "1m", "2p", "2m"):
        s1, s2, _ = adaptive_distortion(versions[key], kernel.pixel_scale, guess)
        shapes[key] = (s1, s2)
    e = np.array(shapes["noshear"])
    response = np.empty((2, 2))
    for j, (plus, minus) in enumerate((("1p", "1m"), ("2p", "2m"))):
        response[:, j] = (np.array(shapes[plus]) - np.array(shapes[minus])) / (2 * kernel.step)
    return e, response


def correcting_noise(
    noise_sigma: float, fix_noise: bool | None, seed: int, index: int, shape: tuple[int, ...]
) -> np.ndarray | None:
    """The noise image that corrects object ``index``'s sheared noise (None when the correction
    is off): from ``SeedSequence([seed, index])``, so results do not depend on chunking."""
    if not (resolve_fix_noise(fix_noise, noise_sigma) and noise_sigma > 0):
        return None
    return np.random.default_rng(np.random.SeedSequence([seed, index])).normal(0.0, noise_sigma, shape)


def measure_chunk(
    images: np.ndarray,
    psf_images: np.ndarray,
    pixel_scale: float,
    noise_sigma: float,
    first_index: int,
    *,
    step: float = 0.01,
    psf: str = "dilate",
    fix_noise: bool | None = None,
    interpolant: str = "lanczos15",
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Per-object ``e`` (N, 2), ``R`` (N, 2, 2) and ``ok`` (N,) for a chunk of stamps.

    ``psf_images`` is one (ny, nx) image or one per object. The correcting noise of object
    ``i`` comes from ``SeedSequence([seed, first_index + i])``, so results do not depend on
    how the objects are split into chunks.
    """
    count = len(images)
    if images.shape[1] != images.shape[2]:
        raise ValueError(f"metacal needs square stamps, got {images.shape[1]}x{images.shape[2]}")
    e = np.full((count, 2), np.nan)
    response = np.full((count, 2, 2), np.nan)
    kernels: dict[bytes, MetacalKernel] = {}
    for i in range(count):
        psf_image = psf_images if psf_images.ndim == 2 else psf_images[i]
        key = np.ascontiguousarray(psf_image).tobytes()
        if key not in kernels:
            kernels.clear()
            kernels[key] = MetacalKernel(
                psf_image, pixel_scale, images.shape[1], step, psf, interpolant
            )
        noise = correcting_noise(noise_sigma, fix_noise, seed, first_index + i, images.shape[1:])
        try:
            e[i], response[i] = measure_one(kernels[key], images[i], noise)
        except galsim.GalSimError:
            pass
    ok = np.all(np.isfinite(e), axis=1) & np.all(np.isfinite(response), axis=(1, 2))
    return {"e": e, "R": response, "ok": ok}


def calibrate(e: np.ndarray, response: np.ndarray, ok: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Shear estimates ``<R>^-1 e`` per object (NaN where not ok) and the mean response used."""
    if not np.any(ok):
        return np.full_like(e, np.nan), np.full((2, 2), np.nan)
    mean_response = response[ok].mean(axis=0)
    g = e @ np.linalg.inv(mean_response).T
    g[~ok] = np.nan
    return g, mean_response
