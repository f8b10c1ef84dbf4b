"""jetson"""
