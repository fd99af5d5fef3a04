"""x2p_ros: 3D vertebra localisation from two calibrated X-rays (X2P-Net)."""
import pkgutil

# The generated message modules (x2p_ros.msg) live in the ROS install's
# site-packages/x2p_ros; let them join this package when it is imported from a
# source tree or an editable install.
__path__ = pkgutil.extend_path(__path__, __name__)

__version__ = "0.1.0"
