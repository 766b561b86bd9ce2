"""Models: ResNet and MobileNetV2 trunks, their ImageNet weights, attention modules, PCB/RPP and
global heads."""
