"""Import-time stand-in for open3d. BENCHMARK USE ONLY (bench/nerfstudio_offline/setup_offline_env.sh).

nerfstudio 1.1.5's ``scripts/exporter.py`` imports open3d at the top, although only the Poisson and
point-cloud exports use it. open3d's wheel (447 MB; 99 MB CPU-only) does not fit the GPU machine's
64 MB carry, so this module lets ``ns-export tsdf`` start; touching any open3d name raises.
"""


def __getattr__(name: str):
    raise ImportError(
        f"open3d.{name}: bench/nerfstudio_offline/shims/open3d is an import-time stand-in; "
        "ns-export poisson / pointcloud need the real open3d (use nerf.export_method=tsdf)"
    )
