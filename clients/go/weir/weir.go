// Package weir connects Go programs to a Weir gateway. The API itself is the generated
// package weir.dev/clients/go/weir/v1 (weirv1); this package adds the two things every
// caller needs around it: a connection that authenticates each call with the tenant's API
// key, and the google.rpc error details (BadRequest, RetryInfo, ErrorInfo) out of an error.
package weir

import (
	"context"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// Dial returns a connection to the gateway at address ("host:port") whose every call
// carries the metadata "authorization: Bearer <apiKey>". Use it with the weirv1 clients,
// e.g. weirv1.NewTaskServiceClient(conn), and Close it when done.
//
// The connection uses TLS with the system's root CAs, for a gateway behind a TLS
// terminator. A local suite (`make run`) listens in plaintext: pass
// grpc.WithTransportCredentials(insecure.NewCredentials()), or your own TLS credentials;
// options given here override the default. Like grpc.NewClient it connects lazily, on the
// first call.
func Dial(address, apiKey string, opts ...grpc.DialOption) (*grpc.ClientConn, error) {
	return grpc.NewClient(address, append([]grpc.DialOption{
		grpc.WithTransportCredentials(credentials.NewClientTLSFromCert(nil, "")),
		grpc.WithPerRPCCredentials(bearer("Bearer " + apiKey)),
	}, opts...)...)
}

// bearer is the API key as gRPC per-call credentials.
type bearer string

func (b bearer) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": string(b)}, nil
}

// RequireTransportSecurity is false so that the key also goes over a plaintext connection
// to a local gateway, which has no TLS of its own; which transport is used is Dial's
// default (TLS) or the caller's explicit choice.
func (bearer) RequireTransportSecurity() bool { return false }

// Detail returns the first detail of type T in the google.rpc.Status an error carries
// (grpc-status-details-bin), e.g. Detail[*errdetails.RetryInfo](err) for a
// RESOURCE_EXHAUSTED; ok is false when there is none or err is not a gRPC status.
func Detail[T proto.Message](err error) (detail T, ok bool) {
	s, _ := status.FromError(err)
	for _, d := range s.Details() {
		if detail, ok = d.(T); ok {
			return detail, true
		}
	}
	return detail, false
}

// FieldViolations returns the BadRequest field violations of an INVALID_ARGUMENT error:
// each names a field of the request (e.g. "task.task_id") and what is wrong with it.
// It is empty for any other error.
func FieldViolations(err error) []*errdetails.BadRequest_FieldViolation {
	badRequest, _ := Detail[*errdetails.BadRequest](err)
	return badRequest.GetFieldViolations()
}
