"""Self-supervised FCMAE pretraining of ProFound-Conv (`python -m pfq.pretrain`)."""
