"""enkg-dist: Ensemble Kalman Diffusion Guidance (Zheng et al., arXiv:2409.20175) for black-box inverse problems.

The library API (enkg_dist.api) is re-exported here lazily, so that `import enkg_dist` stays light:
`enkg_dist.run(forward=G, denoiser=D, y=y, noise=0.1, state_shape=(1, 32, 32))`, `enkg_dist.resume(run_dir, ...)`,
`enkg_dist.load(run_dir)` (the report: `enkg_dist.api.report`, since `enkg_dist.report` is the report module).
"""

__version__ = "0.1.0"  # the source's version; the installed package's is package_version()

_API = ("run", "resume", "load", "Result")  # not report: a submodule of that name exists


def package_version() -> str:
    """The installed package's version (importlib.metadata), else the source's (`__version__`)."""
    from importlib import metadata

    try:
        return metadata.version("enkg-dist")
    except metadata.PackageNotFoundError:
        return __version__


def __getattr__(name: str):
    if name in _API:
        from enkg_dist import api

        return getattr(api, name)
    raise AttributeError(f"module 'enkg_dist' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
