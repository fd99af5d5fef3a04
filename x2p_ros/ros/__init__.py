"""ROS 2 adapters: the x2p_localizer node and the simulated C-arm."""
