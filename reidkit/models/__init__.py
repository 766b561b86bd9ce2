"""Models: ResNet trunk, attention modules, PCB/RPP heads."""
