"""model/finetune"""
