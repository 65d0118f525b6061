package model

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"

	"github.com/aws/aws-sdk-go-v2/aws"
	awshttp "github.com/aws/aws-sdk-go-v2/aws/transport/http"
	awsconfig "github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/aws/smithy-go"
)

// s3src reads a bucket prefix from any S3-compatible endpoint. Credentials
// come from the AWS default chain: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY,
// AWS_PROFILE and ~/.aws/{config,credentials}, then instance roles.
type s3src struct {
	u      URI
	client *s3.Client
}

func newS3(ctx context.Context, u URI, cfg Config) (*s3src, error) {
	if (os.Getenv("AWS_ACCESS_KEY_ID") == "") != (os.Getenv("AWS_SECRET_ACCESS_KEY") == "") {
		return nil, errors.New("only one of AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY is set; set both, or neither to use a profile or instance role")
	}
	opts := []func(*awsconfig.LoadOptions) error{
		awsconfig.WithHTTPClient(awshttp.NewBuildableClient().WithTransportOptions(func(t *http.Transport) {
			tuneTransport(t, cfg.Workers)
		})),
		awsconfig.WithRetryMaxAttempts(1), // the downloader retries with its own backoff and resume
	}
	if cfg.S3Profile != "" {
		opts = append(opts, awsconfig.WithSharedConfigProfile(cfg.S3Profile))
	}
	if cfg.S3Region != "" {
		opts = append(opts, awsconfig.WithRegion(cfg.S3Region))
	}
	ac, err := awsconfig.LoadDefaultConfig(ctx, opts...)
	if err != nil {
		return nil, fmt.Errorf("s3 configuration: %w", err)
	}
	if ac.Region == "" {
		ac.Region = "us-east-1"
	}
	endpoint := cfg.S3Endpoint
	if endpoint == "" {
		endpoint = envOr(os.Getenv("AWS_ENDPOINT_URL_S3"), "AWS_ENDPOINT_URL")
	}
	pathStyle := endpoint != "" // MinIO, versitygw, Ceph and most on-premise stores
	if cfg.S3PathStyle != nil {
		pathStyle = *cfg.S3PathStyle
	}
	client := s3.NewFromConfig(ac, func(o *s3.Options) {
		if endpoint != "" {
			o.BaseEndpoint = aws.String(endpoint)
		}
		o.UsePathStyle = pathStyle
		// Only validate checksums we ask for: ranged GETs carry none.
		o.ResponseChecksumValidation = aws.ResponseChecksumValidationWhenRequired
		o.RequestChecksumCalculation = aws.RequestChecksumCalculationWhenRequired
	})
	return &s3src{u: u, client: client}, nil
}

func (s *s3src) String() string { return s.u.String() }

func (s *s3src) List(ctx context.Context) ([]File, error) {
	prefix := ""
	if s.u.Prefix != "" {
		prefix = s.u.Prefix + "/"
	}
	var out []File
	p := s3.NewListObjectsV2Paginator(s.client, &s3.ListObjectsV2Input{Bucket: aws.String(s.u.Bucket), Prefix: aws.String(prefix)})
	for p.HasMorePages() {
		page, err := p.NextPage(ctx)
		if err != nil {
			return nil, s3Err(s.u, err)
		}
		for _, o := range page.Contents {
			f, ok, err := s3File(aws.ToString(o.Key), prefix, aws.ToInt64(o.Size), aws.ToString(o.ETag))
			if err != nil {
				return nil, err
			}
			if ok {
				out = append(out, f)
			}
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("%s: %w (no objects under the prefix)", s.u, ErrNotFound)
	}
	return out, nil
}

// s3File turns one listed key into a File. A plain ETag (32 hex digits, no
// "-N" multipart suffix) is the object's MD5.
func s3File(key, prefix string, size int64, etag string) (File, bool, error) {
	rel, ok := strings.CutPrefix(key, prefix)
	if !ok || rel == "" || strings.HasSuffix(rel, "/") {
		return File{}, false, nil
	}
	if err := safeRel(rel); err != nil {
		return File{}, false, fmt.Errorf("s3 listing: %w", err)
	}
	if size < 0 {
		return File{}, false, fmt.Errorf("s3 listing: %s has a negative size", key)
	}
	etag = strings.Trim(etag, `"`)
	f := File{Name: rel, Size: size, ETag: etag}
	if isHex(etag, 32) {
		f.MD5 = strings.ToLower(etag)
	}
	return f, true, nil
}

func (s *s3src) Read(ctx context.Context, f File, off, n int64) (io.ReadCloser, error) {
	key := f.Name
	if s.u.Prefix != "" {
		key = s.u.Prefix + "/" + f.Name
	}
	in := &s3.GetObjectInput{Bucket: aws.String(s.u.Bucket), Key: aws.String(key),
		Range: aws.String(fmt.Sprintf("bytes=%d-%d", off, off+n-1))}
	if f.ETag != "" {
		in.IfMatch = aws.String(`"` + f.ETag + `"`) // the object must not change under a resumed pull
	}
	out, err := s.client.GetObject(ctx, in)
	if err != nil {
		return nil, s3Err(s.u, err)
	}
	if out.ContentLength != nil && *out.ContentLength != n {
		out.Body.Close()
		return nil, fmt.Errorf("s3 GET %s bytes %d-%d: got %d bytes", key, off, off+n-1, *out.ContentLength)
	}
	return &exactReader{rc: out.Body, left: n}, nil
}

// s3Err names the usual causes of an S3 failure.
func s3Err(u URI, err error) error {
	var ae smithy.APIError
	if errors.As(err, &ae) {
		switch ae.ErrorCode() {
		case "NoSuchBucket":
			return fmt.Errorf("%s: bucket %q does not exist at this endpoint (check AWS_ENDPOINT_URL and the bucket name): %w", u, u.Bucket, ErrNotFound)
		case "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden":
			return fmt.Errorf("%s: %s: check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE: %w", u, ae.ErrorCode(), err)
		case "PreconditionFailed":
			return fmt.Errorf("%s: the object changed while it was being downloaded; the pull restarts that file: %w", u, errChanged)
		}
	}
	return fmt.Errorf("%s: %w", u, err)
}

var errChanged = errors.New("source object changed")
