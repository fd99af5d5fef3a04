"""pip install -e . gives the `x2p` command line (data, training, evaluation)
without ROS. The ROS 2 build (colcon) uses CMakeLists.txt and package.xml."""
from setuptools import find_packages, setup

setup(
    name="x2p_ros",
    version="0.1.0",
    description="X2P-Net 3D vertebra localisation from biplanar C-arm X-rays, with a ROS 2 node",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["x2p_ros", "x2p_ros.*"]),
    package_data={"x2p_ros": ["models/*.pt", "models/*.json"]},
    install_requires=[
        "torch>=2.2",
        "numpy",
        "scipy",
        "opencv-python-headless",
        "nibabel",
        "tqdm",
        "pyyaml",
        "matplotlib",
    ],
    extras_require={"test": ["pytest<9"]},
    entry_points={"console_scripts": ["x2p = x2p_ros.cli:main"]},
)
